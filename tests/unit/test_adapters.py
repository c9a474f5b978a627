"""LoRA adapters (models/adapters.py) and the low-bit frozen base (precision/base_weights.py)
on tiny BERT, GPT-2 and Llama backbones."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from bitblend.config.schema import AdapterConfig, OptimizerConfig, PrecisionConfig
from bitblend.errors import BitblendError
from bitblend.models.adapters import add_lora, base_state_dict, resolve_targets
from bitblend.models.backbones import load_backbone
from bitblend.models.fused_qkv import FusedQueryLinear, fuse_qkv
from bitblend.models.trunk import HeadSpec, MultiTaskModel
from bitblend.optim.build import build_optimizer, param_roles
from bitblend.precision.base_weights import (
    FrozenBaseEmbedding,
    FrozenBaseLinear,
    freeze_base,
    weight_bytes,
)
from bitblend.precision.recipes import build_precision
from tests.conftest import make_recipe

NF4_CODES = torch.tensor(
    [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
     0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
)  # fmt: skip


def _llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaModel(config)


def _backbone(family: str) -> tuple[nn.Module, int]:
    if family == "llama":
        return _llama(), 300
    backbone, tok = load_backbone(family, dropout=0.0, kernels="torch")
    return backbone, len(tok)


def _model(family: str, image: bool = False) -> tuple[MultiTaskModel, int]:
    backbone, vocab = _backbone(family)
    specs = [HeadSpec("t", "classification", 3)]
    if image:
        specs.append(HeadSpec("img", "classification", 2, modalities=["image"], patch_dim=12,
                              num_patches=4))  # fmt: skip
    torch.manual_seed(0)
    return MultiTaskModel(backbone, specs, head_dropout=0.0).eval(), vocab


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-gpt", "llama"])
def test_zero_initialised_b_gives_the_base_outputs_exactly(family: str) -> None:
    model, vocab = _model(family)
    batch = _batch(vocab)
    with torch.no_grad():
        before = model("t", **batch)
    add_lora(model, AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0))
    model.eval()
    with torch.no_grad():
        after = model("t", **batch)
    assert torch.equal(before, after)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)


def test_only_adapter_head_and_modality_parameters_receive_gradients() -> None:
    model, vocab = _model("tiny-bert", image=True)
    add_lora(model, AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0))
    model.train()
    # B is zero at init, so A's gradient is zero too: move B off zero first.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    loss = model("t", **_batch(vocab)).sum()
    image = {"image": torch.randn(2, 4, 12), "image_mask": torch.ones(2, 4, dtype=torch.long)}
    loss = loss + model("img", **image).sum()
    loss.backward()
    for name, p in model.named_parameters():
        adapter = "lora_" in name
        outside = not name.startswith("backbone.")
        assert p.requires_grad == (adapter or outside), name
        if adapter or outside:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert any(n.startswith("adapters.img.image") for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("family", "expected"),
    [("tiny-bert", ["query", "value"]), ("tiny-gpt", ["c_attn"]), ("llama", ["q_proj", "v_proj"])],
)
def test_query_value_name_each_family_s_layers(family: str, expected: list[str]) -> None:
    backbone, _ = _backbone(family)
    assert resolve_targets(backbone, ["query", "value"]) == expected


def test_a_target_matching_no_layer_is_a_one_line_error() -> None:
    model, _ = _model("tiny-bert")
    with pytest.raises(BitblendError, match=r"model\.adapter\.targets: 'q_proj' matches no"):
        add_lora(model, AdapterConfig(kind="lora", targets=["q_proj"]))


@pytest.mark.parametrize("targets", [["query", "value"], ["query", "key", "value"], "all-linear"])
def test_fused_qkv_leaves_lora_wrapped_projections_alone(targets: list[str] | str) -> None:
    model, vocab = _model("tiny-bert")
    plain, _ = _model("tiny-bert")
    assert fuse_qkv(plain) == 2  # the same backbone without adapters fuses both blocks
    add_lora(model, AdapterConfig(kind="lora", r=4, dropout=0.0, targets=targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        expected = model("t", **_batch(vocab))
        assert fuse_qkv(model) == 0
        assert not any(isinstance(m, FusedQueryLinear) for m in model.modules())
        torch.testing.assert_close(model("t", **_batch(vocab)), expected)


@pytest.mark.slow  # loads BBC News and the MiniLM tokenizer
def test_trainer_conversion_does_not_fuse_an_adapter_model() -> None:
    from bitblend.taskspec import load_data
    from bitblend.train.setup import build_model, convert_model

    recipe = make_recipe("model.kernels=auto", "model.adapter.kind=lora", "model.adapter.r=2",
                         "precision.base_bits=8")  # fmt: skip
    model, _, _ = build_model(recipe, load_data(recipe))
    precision = build_precision(recipe.precision, torch.device("cpu"))
    convert_model(model, recipe, precision)
    assert not any(isinstance(m, FusedQueryLinear) for m in model.modules())
    assert sum(isinstance(m, FrozenBaseLinear) for m in model.modules()) == 2 * 6


def _nf4_layer(w: torch.Tensor) -> FrozenBaseLinear:
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(w)
    return FrozenBaseLinear(linear, 4)


def test_nf4_dequantisation_error_within_the_format_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    w[3, 7] = 0.9  # an outlier: its block's absmax (and error bound) is large
    layer = _nf4_layer(w)
    deq = layer.dequantize(torch.float32)
    # Per block of 64 weights: codes are absmax-normalised to [-1, 1] and rounded to the
    # nearest NF4 code (error <= absmax * half the widest gap between codes), and absmax
    # itself is stored int8-quantised (double quantisation): |w - w'| <= a * gap/2 + |a - a'|.
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    nf4 = layer.weight
    stored = nf4.dequantize_scalers(nf4.quantized_scalers, nf4.quantization_factor,
                                    nf4.scaler_block_size)  # fmt: skip
    half_gap = (NF4_CODES[1:] - NF4_CODES[:-1]).max() / 2
    bound = absmax * half_gap + (absmax - stored).abs() + 1e-6
    err = (deq.reshape(-1, 64) - blocks).abs().amax(dim=1)
    assert torch.all(err <= bound)
    assert (absmax - stored).abs().max() <= absmax.max() / 100  # scales themselves are close
    # Every dequantised value is a code times its block's stored scale.
    codes = deq.reshape(-1, 64) / stored[:, None]
    assert torch.allclose(codes, NF4_CODES[(codes[..., None] - NF4_CODES).abs().argmin(-1)],
                          atol=1e-5)  # fmt: skip


def test_int8_base_error_within_half_a_step_per_row() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 16)
    layer = FrozenBaseLinear(linear, 8)
    err = (layer.dequantize(torch.float32) - linear.weight).abs()
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all(err <= step / 2 + 1e-7)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_frozen_base_linear_matches_its_dequantised_weight_forward_and_backward(bits: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = FrozenBaseLinear(linear, bits)
    w = layer.dequantize(torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = nn.functional.linear(x_ref, w, linear.bias.detach())
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    # Under autocast the matmul runs in the autocast dtype.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    # state_dict gives the dequantised weight in the original layout; loading re-quantises.
    state = layer.state_dict()
    assert state["weight"].shape == (32, 64) and state["weight"].dtype == torch.float32
    twin = FrozenBaseLinear(nn.Linear(64, 32), bits)
    twin.load_state_dict(state)
    again = twin.dequantize(torch.float32)
    if bits == 4:  # NF4's double-quantised block scales are re-derived: close, not equal
        torch.testing.assert_close(again, w, atol=1e-5, rtol=1e-4)
    else:
        assert torch.equal(again, w)


def test_conv1d_base_keeps_gpt2_layout() -> None:
    model, vocab = _model("tiny-gpt")
    batch = _batch(vocab)
    add_lora(model, AdapterConfig(kind="lora", r=4, dropout=0.0))
    with torch.no_grad():
        before = model("t", **batch)
    names = freeze_base(model, 16)
    assert any(n.endswith("c_attn.base_layer") for n in names)
    assert any(n.endswith("mlp.c_fc") for n in names)
    with torch.no_grad():
        after = model("t", **batch)
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)  # bf16 weights
    sd = base_state_dict(model.backbone)
    assert sd["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert not any("lora" in k or "base_layer" in k for k in sd)


def test_base_bits_4_on_a_layer_not_in_nf4_blocks_is_a_one_line_error() -> None:
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(10, 3))
    model.backbone.requires_grad_(False)
    with pytest.raises(BitblendError, match=r"precision\.base_bits: 4 .* backbone\.0 has 30"):
        freeze_base(model, 4)


def _expected_state_bytes(model: nn.Module, bits: int) -> int:
    """Independent count: frozen base Linear weights at `bits` (+ int8 row scales / NF4
    block scales), embedding tables in bf16 or int8 rows, other frozen weights as stored,
    trainable ones with an fp32 gradient and two fp32 Adam moments."""
    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += p.numel() * 4 * 4 + 4  # weight, grad, exp_avg, exp_avg_sq; step count
        elif name.endswith("weight") and isinstance(_owner(model, name), FrozenBaseLinear):
            out, inp = p.shape
            if bits == 16:
                total += out * inp * 2
            elif bits == 8:
                total += out * inp + out * 4
            else:
                blocks = out * inp // 64
                # codes (2 per byte) + int8 block scales + fp32 factor per scaler block
                # + fp32 scaler mean + the 16-entry fp32 code table
                scaler_block = p.scaler_block_size
                total += out * inp // 2 + blocks + (blocks // scaler_block) * 4 + 4 + 16 * 4
        elif name.endswith("codes"):  # a frozen embedding table: bf16, or int8 + row scales
            rows, dim = p.shape
            total += rows * dim * 2 if bits == 16 else rows * dim + rows * 4
        else:
            total += p.numel() * p.element_size()
    return total


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_model_state_bytes_count_the_frozen_base_without_grads_or_states(bits: int) -> None:
    model, vocab = _model("tiny-bert")
    add_lora(model, AdapterConfig(kind="lora", r=4, dropout=0.0))
    cfg = PrecisionConfig(recipe="bf16-mixed", base_bits=bits)  # type: ignore[arg-type]
    precision = build_precision(cfg, torch.device("cpu"))
    precision.convert_module(model)
    roles = param_roles(model)
    optimizer = build_optimizer(precision.optimizer_parameters(model), OptimizerConfig(), roles)
    model.train()
    with precision.forward_context():
        loss = model("t", **_batch(vocab)).float().sum()
    precision.backward(loss)
    assert precision.optimizer_step(optimizer, 1.0).stepped
    measured = precision.model_state_bytes(model, optimizer)
    assert measured == _expected_state_bytes(model, bits)
    full = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Against a full fine-tune (16 bytes per parameter with AdamW in fp32) the frozen base
    # saves its gradient and both moments at least.
    assert measured < 16 * trainable + 4 * (full - trainable)
    assert precision.describe()["base_bits"] == bits


def test_adapter_config_errors_name_the_key() -> None:
    with pytest.raises(BitblendError, match=r"precision\.base_bits: 4 .* model\.adapter\.kind"):
        make_recipe("precision.base_bits=4")
    with pytest.raises(BitblendError, match=r"model\.adapter\.r: expected an integer >= 1"):
        make_recipe("model.adapter.kind=lora", "model.adapter.r=0")
    with pytest.raises(BitblendError, match=r"precision\.recipe: fp8-emulated"):
        make_recipe("model.adapter.kind=lora", "precision.recipe=fp8-emulated")
    with pytest.raises(BitblendError, match=r"precision\.base_bits: expected one of 16, 8, 4"):
        make_recipe("model.adapter.kind=lora", "precision.base_bits=2")
    recipe = make_recipe("model.adapter.kind=lora", "model.adapter.targets=all-linear")
    assert recipe.model.adapter.targets == "all-linear"


def _two_task_model() -> tuple[MultiTaskModel, int]:
    backbone, tok = load_backbone("tiny-bert", dropout=0.0, kernels="torch")
    torch.manual_seed(0)
    specs = [HeadSpec("a", "classification", 3), HeadSpec("b", "classification", 2)]
    return MultiTaskModel(backbone, specs, head_dropout=0.0), len(tok)


def test_a_task_with_its_own_adapter_is_routed_through_it() -> None:
    model, vocab = _two_task_model()
    batch = _batch(vocab)
    with torch.no_grad():
        base_a, base_b = model("a", **batch), model("b", **batch)
    add_lora(model, AdapterConfig(kind="lora", r=4, dropout=0.0), own=["b"])
    # Only task b's adapter moves off zero: task a (shared adapter) keeps the base outputs.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.task_b" in n:
                p.normal_(0, 0.5)
        assert torch.equal(model("a", **batch), base_a)
        assert not torch.allclose(model("b", **batch), base_b)
        assert torch.equal(model("a", **batch), base_a)  # routing switches back
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".default." in n for n in trainable) and any(".task_b." in n for n in trainable)
    # A task-b batch trains task b's adapter (and head) only; a task-a batch the shared one.
    model("b", **batch).sum().backward()
    for name, p in model.named_parameters():
        if (".task_b." in name and "lora_A" in name) or name.startswith("heads.b."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif ".default." in name or name.startswith("heads.a."):
            assert p.grad is None, name
    model.zero_grad(set_to_none=True)
    model("a", **batch).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".task_b." in n)
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B.default" in n)


def test_own_adapter_config_errors_name_the_task() -> None:
    with pytest.raises(BitblendError, match=r"tasks\[0\]\.adapter: own .* model\.adapter\.kind"):
        make_recipe("tasks.0.adapter=own")
    with pytest.raises(BitblendError, match=r"tasks\[0\]\.adapter: own .* mixing\.batches"):
        make_recipe("model.adapter.kind=lora", "tasks.0.adapter=own", "mixing.batches=mixed")


def test_estimate_prices_an_adapter_recipe_below_a_full_fine_tune() -> None:
    """The frozen low-bit base has no gradients or optimizer state (tests/unit/
    test_estimate_adapters.py checks the figures against the built model)."""
    from bitblend.estimate import estimate_recipe
    from tests.unit.test_estimate import FAKE

    recipe = make_recipe("model.adapter.kind=lora", "precision.base_bits=8")
    est = estimate_recipe(recipe, precision="recipe", device=torch.device("cpu"), peaks=FAKE)
    plain = estimate_recipe(make_recipe(), precision="recipe", device=torch.device("cpu"),
                            peaks=FAKE)  # fmt: skip
    assert est.rows[0].memory.static.total < plain.rows[0].memory.static.total / 3
    assert not any("model.adapter" in w for row in est.rows for w in row.warnings)


def test_a_local_llama_directory_gets_lora_over_an_nf4_base(tmp_path) -> None:
    """A Llama-style decoder saved as a local transformers directory (the way users bring
    their own models): LoRA on q_proj / v_proj, then its frozen Linear weights in NF4."""
    from bitblend.models.backbones import _byte_level_tokenizer

    _llama().save_pretrained(tmp_path)
    _byte_level_tokenizer().save_pretrained(tmp_path)
    backbone, tok = load_backbone(str(tmp_path), dropout=0.0, kernels="torch")
    model = MultiTaskModel(backbone, [HeadSpec("t", "classification", 3)], head_dropout=0.0)
    model.eval()
    batch = _batch(len(tok))
    with torch.no_grad():
        before = model("t", **batch)
    add_lora(model, AdapterConfig(kind="lora", r=4, dropout=0.0))
    wrapped = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert wrapped and all(hasattr(model.get_submodule(n), "lora_A") for n in wrapped)
    names = freeze_base(model, 4)
    # q/k/v/o and the three MLP projections of both layers, LoRA'd or not; the token table.
    assert len(names) == 2 * 7 + 1 and "backbone.embed_tokens" in names
    with torch.no_grad():
        after = model("t", **batch)
    # NF4 moves the logits a little, not a lot (measured 6% of their range here).
    ratio = float((after - before).abs().max() / before.abs().max())
    assert 0 < ratio < 0.25


@pytest.mark.parametrize("bits", [16, 8])
def test_frozen_embedding_rows_dequantise_within_the_format_bound(bits: int) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(50, 24)
    low = FrozenBaseEmbedding(table, bits)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    ref = table.weight.detach()
    out = low(ids)
    assert out.dtype == ref.dtype and out.shape == (2, 3, 24)
    torch.testing.assert_close(out, low.weight[ids])  # lookup == rows of the full table
    # bf16: half an ulp, 2^-8 relative; int8 rows: half a step of absmax_row / 127.
    rows = ref.abs().amax(dim=1, keepdim=True)
    bound = ref.abs() * 2.0**-8 if bits == 16 else rows / 127 / 2
    assert torch.all((low.weight - ref).abs() <= bound + 1e-7)
    twin = FrozenBaseEmbedding(nn.Embedding(50, 24), bits)
    twin.load_state_dict(low.state_dict())
    assert torch.equal(twin.weight, low.weight)


def test_a_tied_table_keeps_its_format_and_multimodal_inputs_still_embed() -> None:
    model, _ = _model("tiny-bert", image=True)
    add_lora(model, AdapterConfig(kind="lora", r=4, dropout=0.0))
    names = freeze_base(model, 8)
    assert "backbone.embeddings.word_embeddings" in names
    # The image task goes through inputs_embeds, which reads the table's dtype.
    image = {"image": torch.randn(2, 4, 12), "image_mask": torch.ones(2, 4, dtype=torch.long)}
    assert torch.isfinite(model("img", **image)).all()
    tied = nn.Module()
    tied.backbone = nn.Module()
    tied.backbone.wte = nn.Embedding(10, 4)
    tied.backbone.head = nn.Linear(4, 10, bias=False)
    tied.backbone.head.weight = tied.backbone.wte.weight
    tied.requires_grad_(False)
    assert freeze_base(tied, 8) == []  # table and head read the very same tensor


def _llama_lm_step(
    bits: int, targets: list[str] | str, train_head: bool
) -> tuple[MultiTaskModel, AdapterConfig, Any, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """A tiny Llama decoder with its checkpoint-class causal_lm head, LoRA over a `bits`
    base, one bf16-mixed AdamW step: (model, adapter config, precision, optimizer, batch)."""
    torch.manual_seed(0)
    spec = HeadSpec("lm", "causal_lm", 300, lm_head="LlamaForCausalLM")
    model = MultiTaskModel(_llama(), [spec], head_dropout=0.0)
    cfg = AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0, targets=targets,
                        train_lm_head=train_head)  # fmt: skip
    add_lora(model, cfg)
    precision = build_precision(
        PrecisionConfig(recipe="bf16-mixed", base_bits=bits),  # type: ignore[arg-type]
        torch.device("cpu"),
    )
    precision.convert_module(model)
    optimizer = build_optimizer(
        precision.optimizer_parameters(model), OptimizerConfig(lr=1e-2), param_roles(model)
    )
    batch = _batch(300)
    model.train()
    with precision.forward_context():
        loss = model("lm", **batch).float().logsumexp(-1).mean()
    precision.backward(loss)
    assert precision.optimizer_step(optimizer, 1.0).stepped
    return model, cfg, precision, optimizer, batch


@pytest.mark.parametrize(
    ("bits", "targets", "train_head"),
    [(16, ["q_proj", "v_proj"], True), (16, ["q_proj", "v_proj"], False),
     (8, "all-linear", False), (4, "all-linear", False)],
)  # fmt: skip
def test_llama_causal_lm_adapter_run_saves_its_lm_head_and_reloads(
    tmp_path, bits: int, targets: list[str] | str, train_head: bool
) -> None:
    """A Llama decoder with a causal_lm head, LoRA over a 16/8/4-bit base, one step: only
    adapters (and the LM head with train_lm_head) learn, and model/ reloads (as a
    LlamaForCausalLM checkpoint plus adapter/) to the trained logits. The adapter save once
    wrote a bare LlamaModel over the LM checkpoint, so the reload got a freshly initialised
    lm_head. A frozen head (the default, as in peft / QLoRA) has no gradient and no
    optimizer state, is stored bf16 / int8 rows (so the model state drops by ~15 B per
    head weight), and is saved dequantised."""
    import json

    from bitblend.models.adapters import load_adapter, save_model
    from bitblend.models.backbones import _byte_level_tokenizer
    from bitblend.models.trunk import load_model

    model, cfg, precision, optimizer, batch = _llama_lm_step(bits, targets, train_head)
    learnt = {n for n, p in model.named_parameters() if p.grad is not None}
    assert learnt and all("lora_" in n or n.startswith("heads.lm.") for n in learnt)
    assert any(n.startswith("heads.lm.") for n in learnt) == train_head
    if targets == "all-linear":  # the MLP projections too, never the frozen token table
        assert any("mlp.down_proj.lora_B" in n for n in learnt)
    else:
        assert not any("mlp" in n or "o_proj" in n for n in learnt)
    head = model.heads["lm"]
    stepped = {id(p) for p in optimizer.state}
    assert all((id(p) in stepped) == train_head for p in head.parameters())
    if not train_head:  # frozen: in the base's format, int8 rows where the base is NF4
        assert isinstance(head, FrozenBaseLinear) and head.bits == (16 if bits == 16 else 8)
        assert not any(p.requires_grad for p in head.parameters())
    # Model state: weights as stored, and per trainable weight an fp32 gradient and two
    # AdamW moments (+ a 4-byte step counter per tensor); a frozen head adds only its
    # stored bytes (int8 rows: 1 B + an fp32 scale per row, not 16 B per weight).
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = weight_bytes(model) + sum(12 * p.numel() + 4 for p in trainable)
    assert precision.model_state_bytes(model, optimizer) == expected
    if not train_head and bits != 16:
        assert head.stored_bytes() == 300 * 64 + 4 * 300
    head_weight = head.state_dict()["weight"]  # a frozen head hands back its dequantised W
    model.eval()
    with torch.no_grad():
        trained = model("lm", **batch)  # fp32 compute over the dequantised base
    save_model(model, tmp_path, _byte_level_tokenizer(), adapter=cfg)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    loaded, _, meta = load_model(tmp_path)
    assert torch.equal(loaded.heads["lm"].weight, head_weight)
    assert load_adapter(loaded, tmp_path, meta)
    assert loaded.heads["lm"].weight.requires_grad == train_head
    loaded.float().eval()
    with torch.no_grad():
        again = loaded("lm", **batch)
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train_head", [False, True])
def test_a_tied_gpt2_lm_head_is_the_token_table_frozen_or_trained_with_it(
    train_head: bool,
) -> None:
    """GPT-2's checkpoint head is tied to its token table: frozen by default with the rest of
    the backbone (and left in its format by freeze_base: two modules read it), trained as
    that very table with train_lm_head; the tie holds either way and a step runs."""
    backbone, vocab = _backbone("tiny-gpt")
    spec = HeadSpec("lm", "causal_lm", vocab, lm_head="GPT2LMHeadModel")
    model = MultiTaskModel(backbone, [spec], head_dropout=0.0)
    table = backbone.get_input_embeddings().weight
    add_lora(model, AdapterConfig(kind="lora", r=4, dropout=0.0, train_lm_head=train_head))
    precision = build_precision(
        PrecisionConfig(recipe="32-true", base_bits=8),  # type: ignore[arg-type]
        torch.device("cpu"),
    )
    precision.convert_module(model)
    head = model.heads["lm"]
    assert type(head) is nn.Linear and head.weight is table  # still tied, not quantised
    assert table.requires_grad == train_head
    optimizer = build_optimizer(
        precision.optimizer_parameters(model), OptimizerConfig(lr=1e-2), param_roles(model)
    )
    before = table.detach().clone()
    precision.backward(model("lm", **_batch(vocab)).logsumexp(-1).mean())
    assert precision.optimizer_step(optimizer, 1.0).stepped
    assert torch.equal(table.detach(), before) != train_head
