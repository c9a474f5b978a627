"""Bytes of one training step: parameters, gradients, master copies, optimizer states,
saved activations and temporary buffers, per precision recipe (per rank under data
parallelism: estimate/ranks.py).

Arithmetic on sizes only. Activations count what autograd really saves in HF's BERT and
GPT-2 blocks as bitblend runs them (the tests check it against saved-tensor hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bitblend.estimate.shapes import ModelShape, TaskShape
from bitblend.models.attention import query_blocks

FP32 = 4
INT64 = 8
# Blockwise-quantised optimizer states (bitsandbytes, torchao) keep one fp32 scale per
# block of 256 values: 4/256 extra bytes per state element.
QUANT_BLOCK = 256
# CPU only: glibc malloc keeps freed blocks for reuse rather than returning them to the OS,
# so peak RSS grows more than the live tensors do: 1.19-1.32x the live-tensor peak over 8
# MiniLM cases here (docs/estimate.md). CUDA's max_memory_allocated needs no such term.
CPU_ALLOCATOR_SLACK = 0.25


@dataclass(frozen=True)
class PrecisionSpec:
    """The byte widths a precision recipe gives each kind of tensor (trunk parameters)."""

    name: str
    weight_bytes: int  # stored trunk weights (norms and pooled heads stay fp32)
    grad_bytes: int  # gradients of those weights
    master: bool  # an fp32 master copy that the optimizer updates
    state_bits: int  # width of each optimizer state element
    compute_bytes: int  # matmul inputs and outputs (autocast or weight dtype)
    autocast: bool  # autocast caches a cast copy of every matmul weight for the step
    hypothetical: bool = False  # a what-if row, not selectable in a recipe today
    note: str = ""
    comp_bytes: int = 0  # Kahan compensation buffer per low-precision weight

    @property
    def compute_dtype(self) -> str:
        """Name of the matmul dtype, the key of the probed peak."""
        if self.compute_bytes == FP32:
            return "float32"
        return "float16" if self.name.startswith("16") else "bfloat16"


RECIPES = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "fp8-emulated", "fp8")


def precision_spec(
    name: str,
    *,
    master_weights: bool = True,
    state_bits: int | None = None,
    rounding: str = "nearest",
) -> PrecisionSpec:
    """The spec of a recipe name and its precision.* settings (`state_bits` None = 32)."""
    if name == "32-true":
        spec = PrecisionSpec(name, 4, 4, False, 32, 4, False, note="fp32 everything")
    elif name in ("bf16-mixed", "16-mixed"):
        # fp32 weights are the master copy; autocast runs matmuls in 16 bits.
        spec = PrecisionSpec(name, 4, 4, False, 32, 2, True, note="fp32 weights, 16-bit matmuls")
    elif name in ("fp8-emulated", "fp8"):
        # Memory as bf16-mixed: fp32 weights, bf16 autocast; the fp8 casts are per-step
        # temporaries (real fp8 GEMMs would halve the saved matmul inputs, not modelled).
        spec = PrecisionSpec(name, 4, 4, False, 32, 2, True, note="fp32 weights, fp8 Linear")
    elif name == "bf16-true":
        # Without a master copy the optimizer updates a transient fp32 copy of the bf16
        # weights, so its states keep the width state_bits asks for (32 by default).
        note = "bf16 weights + fp32 master" if master_weights else f"pure bf16, {rounding}"
        comp = 2 if rounding == "kahan" and not master_weights else 0
        spec = PrecisionSpec(name, 2, 2, master_weights, 32, 2, False, note=note, comp_bytes=comp)
    else:
        raise ValueError(f"unknown precision recipe {name!r}")
    return spec if state_bits is None else replace(spec, state_bits=state_bits)


def what_if_specs() -> list[PrecisionSpec]:
    """Variant rows beside the plain recipes: pure bf16 and low-bit optimizer states (each
    selectable with precision.master_weights / rounding / state_bits)."""
    pure = {"master_weights": False}
    rows = [
        ("bf16-true+SR", precision_spec("bf16-true", **pure, rounding="stochastic"),
         "master_weights false, rounding stochastic"),
        ("bf16-true+Kahan", precision_spec("bf16-true", **pure, rounding="kahan"),
         "master_weights false, rounding kahan"),
        ("32-true+8bit", precision_spec("32-true", state_bits=8), "state_bits 8"),
        ("bf16-mixed+8bit", precision_spec("bf16-mixed", state_bits=8), "state_bits 8"),
        ("bf16-true+SR+16bit", precision_spec("bf16-true", **pure, state_bits=16,
         rounding="stochastic"), "pure bf16, SR, bf16 states"),
        ("bf16-true+SR+8bit", precision_spec("bf16-true", **pure, state_bits=8,
         rounding="stochastic"), "pure bf16, SR, 8-bit states"),
        ("bf16-true+SR+4bit", precision_spec("bf16-true", **pure, state_bits=4,
         rounding="stochastic"), "pure bf16, SR, 4-bit states (adam/adamw)"),
    ]  # fmt: skip
    return [replace(spec, name=name, note=note) for name, spec, note in rows]


def optimizer_states(name: str, momentum: float = 0.0) -> int:
    """State tensors per parameter: Adam/AdamW 2 (moments), RMSprop 1 (+1), SGD 0 (+1)."""
    extra = 1 if momentum > 0 else 0
    return {"adam": 2, "adamw": 2, "rmsprop": 1 + extra, "sgd": extra}[name]


def state_bytes_per_element(bits: int) -> float:
    """Bytes of one optimizer state element, with block scales below 16 bits."""
    if bits >= 16:
        return bits / 8
    return bits / 8 + FP32 / QUANT_BLOCK


def bytes_per_param(spec: PrecisionSpec, states: int = 2) -> float:
    """Weights + grads + master + optimizer states per low-precision trunk parameter.

    fp32 AdamW 16; bf16-mixed 16; pure bf16 with fp32 states 12 (Kahan 14), with bf16
    states 8; 8-bit states with fp32 weights ~10; bf16-true + SR + 8-bit ~6.
    """
    master = FP32 if spec.master else 0
    return (
        spec.weight_bytes
        + spec.grad_bytes
        + master
        + spec.comp_bytes
        + states * state_bytes_per_element(spec.state_bits)
    )


@dataclass
class StaticBytes:
    """Bytes that live for the whole run: weights, grads, master copy, optimizer states."""

    weights: int
    grads: int
    master: int
    states: int

    @property
    def total(self) -> int:
        """Everything together."""
        return self.weights + self.grads + self.master + self.states


def static_bytes(shape: ModelShape, spec: PrecisionSpec, states: int) -> StaticBytes:
    """Per-parameter bytes of the whole model, fp32-kept parameters counted at 4 bytes.

    A LoRA run's frozen backbone holds weights only (in precision.base_bits' format where
    set): no gradient, no master copy, no optimizer state."""
    trainable, trainable_fp32 = shape.trainable
    low = trainable - trainable_fp32 if spec.weight_bytes < FP32 else 0
    high = trainable - low
    frozen = shape.adapter.frozen_bytes(spec.weight_bytes) if shape.adapter else 0
    # An idle token table (shapes.idle_table_params) is stored, but has no gradient and no
    # optimizer state: AdamW skips parameters whose grad is None.
    idle = shape.idle_params
    idle_grads = idle * (spec.grad_bytes if low else FP32)
    # The optimizer steps fp32 tensors (fp32-kept params, master copies) or, without a
    # master, the low-precision weights themselves; state width follows spec.state_bits.
    state_elems = states * (trainable - idle)
    return StaticBytes(
        weights=low * spec.weight_bytes + high * FP32 + frozen,
        grads=low * spec.grad_bytes + high * FP32 - idle_grads,
        master=low * FP32 if spec.master else low * spec.comp_bytes,
        states=round(state_elems * state_bytes_per_element(spec.state_bits)),
    )


@dataclass
class ActivationBytes:
    """Bytes autograd saves for backward in one micro-batch, by part of the model."""

    per_layer: dict[str, int] = field(default_factory=dict)
    layers: int = 0
    embeddings: int = 0
    head: int = 0
    layer_input: int = 0  # what checkpointing keeps per layer: its input hidden states
    # The attention the step runs: "bitblend" (models/attention.py, probs in the compute
    # dtype), SDPA's "math" (probs in fp32 on CPU) or "flash" (no probs kept)
    attention: str = "math"

    @property
    def layer(self) -> int:
        """One transformer block."""
        return sum(self.per_layer.values())

    @property
    def total(self) -> int:
        """Every layer, embeddings and head, without checkpointing."""
        return self.layers * self.layer + self.embeddings + self.head

    @property
    def checkpointed(self) -> int:
        """With per-layer activation checkpointing: layer inputs + one layer recomputed."""
        return self.layers * self.layer_input + self.layer + self.embeddings + self.head


def attention_backend(shape: ModelShape, device: str) -> str:
    """bitblend's own kernel on CPU (model.kernels=auto; grouped k/v heads included); else
    SDPA's choice: CPU flash attention has no dropout, so training with it runs `math`."""
    if device == "cpu" and shape.kernels == "auto":
        return "bitblend"
    return "math" if device == "cpu" and shape.attn_dropout > 0 else "flash"


def score_elements(shape: ModelShape, s: int, backend: str) -> tuple[int, int]:
    """(attention scores per batch row and head that a step computes and keeps, those of
    its largest block): s x s, except bitblend's kernel on a causal model, which runs
    blocks of queries against the keys up to each block's end (`query_blocks`; it
    computes 10/16 of s x s at 512 tokens)."""
    if backend != "bitblend" or not shape.causal:
        return s * s, s * s
    blocks = [(end - start) * end for start, end in query_blocks(s)]
    return sum(blocks), max(blocks, default=0)


def fast_dropout(shape: ModelShape, device: str) -> bool:
    """Dropout masks saved as bool (models/attention.py) rather than in the input dtype."""
    return device == "cpu" and shape.kernels == "auto"


def fused_qkv(shape: ModelShape, spec: PrecisionSpec) -> bool:
    """One q/k/v matmul per block (models/fused_qkv.py, model.kernels=auto, any device);
    GPT-2's c_attn is fused already, and fp8 recipes' converted layers stay separate."""
    ad = shape.adapter  # peft-wrapped or low-bit q/k/v are not plain Linear layers
    if ad is not None and (ad.qkv_targeted or ad.base_bits is not None):
        return False
    return shape.kernels == "auto" and shape.family != "gpt2" and not spec.name.startswith("fp8")


def activation_bytes(
    shape: ModelShape, task: TaskShape, spec: PrecisionSpec, device: str = "cpu"
) -> ActivationBytes:
    """Saved tensors of one micro-batch of `task` (see the module docstring)."""
    b, s, h, i, nh = task.batch, task.seq, shape.hidden, shape.intermediate, shape.heads
    t = b * s
    c = spec.compute_bytes  # matmul inputs (autocast copies under mixed recipes)
    w = FP32 if spec.weight_bytes == FP32 else spec.weight_bytes  # residual stream dtype
    backend = attention_backend(shape, device)
    # CPU math SDPA upcasts bf16/fp16 to fp32 for accuracy; elsewhere it keeps the dtype.
    a = FP32 if device == "cpu" and backend == "math" else c
    # bitblend's dropout saves a bool mask; PyTorch's CPU dropout multiplies by a noise
    # tensor of the input's size and dtype and saves that.
    fast = fast_dropout(shape, device)
    m = 1 if fast else c
    # Autocast casts activations anew for every matmul (it caches only weights): BERT's
    # separate q, k, v projections each save their own 16-bit copy of the fp32 input,
    # unless bitblend fused them into one matmul.
    fused = fused_qkv(shape, spec)
    qkv = 3 if shape.family != "gpt2" and spec.autocast and not fused else 1
    # Math SDPA's (and bitblend's) output is copied back to (T, h) for the output
    # projection; flash attention's output already has that layout, so the projection
    # saves a view of it.
    ctx = 0 if backend == "flash" else 1
    layer: dict[str, int] = {
        # inputs of the QKV, attention-output and first MLP projections: (T, h) each
        "matmul inputs": (qkv + ctx + 1) * t * h * c,
        # GELU input and output (the second projection's input); the tanh formula of
        # gpt2's gelu_new saves x, tanh(.), 0.5x, 1+tanh(.) and the product.
        "mlp activation": (5 if shape.act == "gelu_new" else 2) * t * i * c,
        # LayerNorm inputs are upcast to fp32 in every recipe, plus mean and rstd (T,)
        "norm inputs": 2 * (t * h * FP32 + 2 * t * FP32),
    }
    if fused and not spec.autocast:
        # the fused matmul saves its concatenated (3h, h) weight, a tensor of its own
        # (under autocast that is the weight's 16-bit copy, counted with those)
        layer["fused qkv weight"] = 3 * h * h * spec.weight_bytes
    if shape.hidden_dropout > 0:
        layer["dropout masks"] = 2 * t * h * m
    if backend == "bitblend":
        # scaled q, k and (scaled) v (T, h), the softmax output (b, heads, s, s); with
        # dropout also its bool mask and the dropped probs the second matmul saves.
        scores = score_elements(shape, s, backend)[0]
        probs = b * nh * scores * a
        dropped = b * nh * scores * (1 + a) if shape.attn_dropout > 0 else 0
        layer["attention"] = 3 * t * h * a + probs + dropped
    elif backend == "math":
        # scaled q, scaled k and v (T, h) plus probs (b, heads, s, s); with dropout also
        # its mask and the dropped probs.
        probs = (3 if shape.attn_dropout > 0 else 1) * b * nh * s * s * a
        layer["attention"] = 3 * t * h * a + probs
    else:
        # q, k, v, output (T, h) in the compute dtype and the log-sum-exp (b, heads, s).
        # (GPT-2 counted 2 (T, h) more while transformers built a KV cache in training:
        # the cache's copies of k and v were what its attention saved.)
        qkv_saved = 4
        layer["attention"] = qkv_saved * t * h * c + b * nh * s * FP32
    # embeddings: token ids and (not BERT, whose are slices of a registered buffer)
    # position ids, a LayerNorm input (BERT; GPT-2's final ln_f is counted here too) and
    # the embedding dropout mask
    ids = t * INT64 + (0 if shape.family == "bert" else s * INT64)
    emb = ids + t * h * FP32 + 2 * t * FP32
    if shape.hidden_dropout > 0:
        emb += t * h * (1 if fast else w)
    if shape.family == "llama":
        emb += _llama_layer(shape, task, spec, layer, fused, backend)
    if shape.adapter is not None:
        emb = _lora_layer(shape, task, spec, layer, emb, fast, a)
    head = _head_bytes(shape, task, spec, fast)
    return ActivationBytes(
        per_layer=layer,
        layers=shape.layers,
        embeddings=emb,
        head=head,
        layer_input=t * h * w,
        attention=backend,
    )


def _llama_layer(
    shape: ModelShape,
    task: TaskShape,
    spec: PrecisionSpec,
    layer: dict[str, int],
    fused: bool,
    backend: str,
) -> int:
    """A Llama block's saved tensors (in place in `layer`, replacing the BERT layout's);
    returns the final RMSNorm's extra bytes for the embeddings' part. Counted with
    saved-tensor hooks on llama-tiny (tests/unit/test_estimate_llama.py):

    - each RMSNorm upcasts its input to fp32 and saves it, the normalised (T, h) fp32
      product and rsqrt (T,): its output feeds the matmuls in their dtype;
    - the q/k/v projections (one fused matmul under model.kernels=auto; three autocast
      copies of their input without it) and SwiGLU's gate and up projections (two autocast
      copies under autocast, one shared input otherwise) save their (T, h) input;
    - SwiGLU keeps four (T, i) tensors: gate and up outputs, SiLU's output, their product;
    - grouped-query attention runs SDPA: q and its output (T, h), k and v (T, kv width),
      v's storage being the whole fused q/k/v output when fused;
      RoPE's cos and sin are (s, head dim) and not counted;
    - without autocast the fused q/k/v matmul saves its concatenated weight, (h + 2 kv) x h.
    """
    t, h, i, c = task.tokens, shape.hidden, shape.intermediate, spec.compute_bytes
    kv = h * (shape.kv_heads or shape.heads) // shape.heads
    qkv = 3 if spec.autocast and not fused else 1
    gate_up = 2 if spec.autocast else 1
    layer["norm inputs"] = 2 * (2 * t * h * FP32 + t * FP32)
    layer["matmul inputs"] = (qkv + gate_up) * t * h * c
    layer["mlp activation"] = 4 * t * i * c
    if "fused qkv weight" in layer:
        layer["fused qkv weight"] = (h + 2 * kv) * h * spec.weight_bytes
    b, s = task.batch, task.seq
    if backend == "flash":
        # q, its output (the output projection's input), k, v and the log-sum-exp. v is a
        # view of the projection's output: with fused q/k/v, SDPA saving v keeps the whole
        # (T, h + 2 kv) output alive (k is RoPE's new tensor).
        v = t * (h + 2 * kv) * c if fused else t * kv * c
        layer["attention"] = 2 * t * h * c + t * kv * c + v + b * shape.heads * s * FP32
    elif backend == "bitblend":
        # scaled q, the output projection's input, contiguous copies of k and v (the
        # matmuls' own; grouped heads are not repeated) and the probabilities of every
        # causal block; with dropout its mask and the dropped probabilities too
        scores = b * shape.heads * score_elements(shape, s, backend)[0]
        dropped = scores * (1 + c) if shape.attn_dropout > 0 else 0
        layer["attention"] = 2 * t * h * c + 2 * t * kv * c + scores * c + dropped
    # the final RMSNorm saves a second fp32 (T, h) beyond the one filed with the embeddings
    return t * h * FP32


def _lora_layer(
    shape: ModelShape,
    task: TaskShape,
    spec: PrecisionSpec,
    layer: dict[str, int],
    emb: int,
    fast: bool,
    a: int,
) -> int:
    """A LoRA run's saved tensors (in place in `layer`); returns the embeddings' part.

    A frozen projection saves no input (no weight gradient to compute; the low-bit ones
    keep nothing at all, plain ones under autocast their 16-bit weight copy, counted with
    autocast's copies). Each adapter saves its input after its dropout (and the dropout
    mask) and its (T, r) middle. GELU's output only fed the frozen second projection. A
    frozen embedding table saves nothing, and nothing before the first block needs a
    gradient, so the first block keeps neither its adapters' dropout masks, nor q when
    the key projection has no adapter, nor (GPT-2) its first norm's input."""
    ad = shape.adapter
    assert ad is not None
    t, h, c = task.tokens, shape.hidden, spec.compute_bytes
    mask = (1 if fast else c) if ad.dropout > 0 else 0
    per_layer_masks = ad.lora_in_per_layer * t * mask
    layer["matmul inputs"] = t * (ad.lora_in_per_layer + ad.lora_layers_per_layer * ad.r) * c
    layer["lora dropout masks"] = per_layer_masks
    layer.pop("fused qkv weight", None)
    saves = 5 if shape.act == "gelu_new" else 2
    layer["mlp activation"] = (saves - 1) * t * shape.intermediate * c
    if shape.trainable_inputs:
        return emb
    first = per_layer_masks + (0 if ad.key_targeted else t * h * a)
    if shape.family == "gpt2":
        first += t * h * FP32 + 2 * t * FP32  # ln_1 of the first block
    layer["first block (no input gradient)"] = -round(first / max(shape.layers, 1))
    # GPT-2's final ln_f (filed with the embeddings) still saves its input.
    return t * h * FP32 + 2 * t * FP32 if shape.family == "gpt2" else 0


def _head_bytes(shape: ModelShape, task: TaskShape, spec: PrecisionSpec, fast: bool) -> int:
    """Pooling, head and loss: small for pooled heads, (T, vocab) for LM heads."""
    b, t, h = task.batch, task.tokens, shape.hidden
    if task.per_token:
        lm = task.head in ("masked_lm", "causal_lm")
        # LM heads run in the compute dtype; token-classification heads stay fp32. The loss
        # upcasts the logits and log_softmax saves its (T, outputs) fp32 result.
        width = spec.compute_bytes if lm else FP32
        # A frozen LM head (model.adapter.train_lm_head false) computes no weight gradient,
        # so it saves no copy of its input.
        frozen = shape.adapter is not None and task.name in shape.adapter.frozen_heads
        return (0 if frozen else t * h * width) + t * task.outputs * FP32 + t * INT64
    # pooling mask (b, s, 1), head dropout mask (bool with bitblend's dropout) and head
    # input (b, h) in fp32
    mask = 1 if fast else FP32
    return t * FP32 + b * h * (mask + FP32) + b * task.outputs * FP32


def temporary_bytes(
    shape: ModelShape, task: TaskShape, spec: PrecisionSpec, acts: ActivationBytes
) -> dict[str, int]:
    """Transient buffers at the backward peak, beyond saved activations."""
    b, s, t, h, i = task.batch, task.seq, task.tokens, shape.hidden, shape.intermediate
    c = spec.compute_bytes
    out: dict[str, int] = {}
    ad = shape.adapter
    if spec.autocast:
        # Autocast caches one 16-bit copy of each matmul weight and bias for the step (a
        # frozen fp32 one is cast anew per use, and saved for backward: the same bytes).
        matmul = shape.matmul_params
        if ad is not None:
            matmul += ad.lora_params
            if ad.base_bits is not None:  # low-bit frozen layers keep no 16-bit copy
                linears = 4 * (h * h + h) + (h * i + i) + (i * h + h)
                matmul -= shape.layers * linears
                # nor does a frozen LM head stored in the base's format
                matmul -= sum(r * c for kind, r, c in ad.quantised if kind == "head")
        out["autocast weight copies"] = matmul * spec.compute_bytes
    if ad is not None and ad.base_bits is not None and (ad.base_bits < 16 or c == FP32):
        # one frozen weight dequantised at a time, in the compute dtype
        out["dequantised weight"] = ad.largest_frozen * spec.compute_bytes
    # Backward of one op holds the incoming gradient and the outgoing one: the biggest pair
    # is the attention probs (fp32 in math SDPA, the compute dtype in bitblend's kernel) or
    # the MLP activation; plus the residual gradient.
    a = spec.compute_bytes if acts.attention == "bitblend" else FP32
    block = score_elements(shape, s, acts.attention)[1]  # one causal block's, or s x s
    probs = b * shape.heads * block * a if acts.attention != "flash" else 0
    out["backward buffers"] = 2 * max(probs, t * i * spec.compute_bytes) + 2 * t * h * FP32
    if task.per_token:
        # logits in their dtype, their fp32 copy and the gradient of log_softmax
        out["logits"] = t * task.outputs * (spec.compute_bytes + 2 * FP32)
        out.update(causal_shift_bytes(task))
    return out


def causal_shift_bytes(task: TaskShape) -> dict[str, int]:
    """causal_lm's loss (tasks/losses.py) shifts the fp32 logits by one position,
    logits[:, :-1], and flattens them for cross_entropy: the slice is not contiguous, so the
    reshape copies all (T, vocab) fp32 logits once more while the others are alive."""
    if task.head != "causal_lm":
        return {}
    return {"causal_lm shifted logits copy": task.tokens * task.outputs * FP32}


@dataclass
class PeakBytes:
    """The step's memory, split for the report; all values in bytes."""

    static: StaticBytes
    activations: int
    activations_checkpointed: int
    temporary: dict[str, int]
    step_extra: int  # optimizer-step transients (fp32 master grads, foreach temporaries)

    @property
    def resident(self) -> int:
        """Alive through the whole step: weights, master copy, optimizer states."""
        return self.static.weights + self.static.master + self.static.states

    @property
    def temporary_total(self) -> int:
        """All transient buffers together."""
        return sum(self.temporary.values())

    @property
    def optimizer_step(self) -> int:
        """Live bytes at the optimizer step: every gradient alive, activations freed."""
        return self.resident + self.static.grads + self.step_extra

    @property
    def peak(self) -> int:
        """Live tensor bytes at the worst moment of the step."""
        backward = self.resident + self.activations + self.temporary_total
        return max(backward, self.optimizer_step)

    @property
    def peak_checkpointed(self) -> int:
        """The same with per-layer activation checkpointing."""
        backward = self.resident + self.activations_checkpointed + self.temporary_total
        return max(backward, self.optimizer_step)


def peak_bytes(
    shape: ModelShape,
    task: TaskShape,
    spec: PrecisionSpec,
    states: int,
    device: str = "cpu",
    fused_optimizer: bool = True,
) -> PeakBytes:
    """Peak live bytes of a step (gradients of the previous step are gone: zero_grad sets
    them to None).

    Backward starts with every activation alive and no gradient yet; each block then frees
    its activations while its gradients appear, so the start of backward is the worst point
    unless the gradients outweigh the activations (tiny batches), which the optimizer step
    covers.
    """
    st = static_bytes(shape, spec, states)
    acts = activation_bytes(shape, task, spec, device)
    temp = temporary_bytes(shape, task, spec, acts)
    # A master copy needs fp32 gradients converted from the bf16 ones; non-fused (foreach)
    # optimizers allocate about one parameter-sized temporary.
    extra = 0
    trainable, trainable_fp32 = shape.trainable
    if spec.master:
        extra += (trainable - trainable_fp32) * FP32
    if not fused_optimizer and states:
        extra += trainable * FP32
    return PeakBytes(st, acts.total, acts.checkpointed, temp, extra)
