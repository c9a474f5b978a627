"""One q/k/v matmul per attention block (models/fused_qkv.py): the same function and
gradients as the three separate layers, the same state_dict, falls back whenever the
key/value layers are called with another input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from bitblend.models.backbones import load_backbone
from bitblend.models.fused_qkv import FusedQueryLinear, FusedSliceLinear, fuse_qkv, unfuse_qkv
from bitblend.precision.recipes import build_precision
from bitblend.taskspec import load_data
from bitblend.train.setup import build_model, convert_model
from tests.conftest import make_recipe
from tests.unit.test_attention import FAMILIES


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.train()


def _run(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    out[keep].square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out[keep].detach(), grads


def _compare(model: nn.Module, vocab: int, expected_blocks: int) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    _no_dropout(model)
    keys = list(model.state_dict())
    plain_out, plain_grads = _run(model, ids, mask)
    assert fuse_qkv(model) == expected_blocks
    assert list(model.state_dict()) == keys  # same parameters, same names
    fused_out, fused_grads = _run(model, ids, mask)
    torch.testing.assert_close(fused_out, plain_out, atol=1e-5, rtol=1e-4)
    assert fused_grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # nothing is held between forwards: every slot handed both slices out
    for m in model.modules():
        if isinstance(m, FusedSliceLinear):
            assert m.__dict__["_bitblend_slot"].input is None


def test_tiny_bert_fused_equals_separate() -> None:
    model, _ = load_backbone("tiny-bert")
    _compare(model, 100, model.config.num_hidden_layers)
    kinds = {type(m) for m in model.modules()}
    assert FusedQueryLinear in kinds and FusedSliceLinear in kinds


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_fused_equal_separate(family: str, tmp_path: Path) -> None:
    """DistilBERT (q_lin), RoBERTa/ELECTRA (query), Llama with grouped KV heads (q_proj,
    narrower k/v)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from bitblend.models.backbones import minilm_path

    config = AutoConfig.for_model(family, vocab_size=100, **FAMILIES[family])
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    model, _ = load_backbone(str(tmp_path))
    _compare(model, 100, 1)


def _block(bias: bool = True) -> nn.Module:
    block = nn.Module()
    block.query, block.key, block.value = (nn.Linear(8, 8, bias=bias) for _ in range(3))
    return block


def test_key_called_with_another_input_unfuses_the_block() -> None:
    """Cross-attention calls key/value with the encoder's states: no stale slice, and
    from then on each layer computes itself (no wasted k/v, nothing held)."""
    torch.manual_seed(0)
    block = _block()
    ref = copy.deepcopy(block)
    assert fuse_qkv(block) == 1
    slot = block.key.__dict__["_bitblend_slot"]
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(block.query(x), ref.query(x))
    assert slot.input is x  # the query layer left k and v for x
    torch.testing.assert_close(block.key(other), ref.key(other))  # not the slice of x
    assert slot.disabled and slot.input is None and not slot.outputs
    torch.testing.assert_close(block.query(x), ref.query(x))
    assert slot.input is None  # unfused: the query computes only itself
    torch.testing.assert_close(block.value(x), ref.value(x))


def test_value_before_query_on_a_persistent_input() -> None:
    """Another call order with the same input tensor every time: never a previous
    call's slice."""
    torch.manual_seed(0)
    block = _block()
    ref = copy.deepcopy(block)
    fuse_qkv(block)
    x = torch.randn(3, 8)
    for _ in range(2):
        v = block.value(x)
        q = block.query(x)
        k = block.key(x)
        with torch.no_grad():
            block.key.weight.add_(1.0)  # a new step's weights
            ref.key.weight.add_(1.0)
        torch.testing.assert_close(v, ref.value(x))
        torch.testing.assert_close(q, ref.query(x))
        torch.testing.assert_close(k + x @ torch.ones(8, 8), ref.key(x))


def test_cross_attention_model_equals_unfused() -> None:
    """A BERT decoder with cross-attention: fused self-attention, the cross-attention
    blocks unfuse themselves on their first call; outputs equal, model still copies."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, is_decoder=True,
                        add_cross_attention=True)  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config).eval()
    ref = copy.deepcopy(model)
    assert fuse_qkv(model) == 2
    ids = torch.randint(0, 50, (2, 5))
    enc = torch.randn(2, 7, 16)
    for _ in range(2):
        got = model(input_ids=ids, encoder_hidden_states=enc).last_hidden_state
        want = ref(input_ids=ids, encoder_hidden_states=enc).last_hidden_state
        torch.testing.assert_close(got, want)
    cross = model.encoder.layer[0].crossattention.self.key.__dict__["_bitblend_slot"]
    own = model.encoder.layer[0].attention.self.key.__dict__["_bitblend_slot"]
    assert cross.disabled and not own.disabled
    copy.deepcopy(model)  # no autograd-tracked tensors left behind in a slot


def test_only_plain_same_dtype_triples_are_fused() -> None:
    wrapped = _block()
    wrapped.key.forward = wrapped.key.forward  # a wrapped forward (keep_fp32) stays alone
    assert fuse_qkv(wrapped) == 0
    pruned = _block()
    prune.l1_unstructured(pruned.key, "weight", 0.5)  # the weight comes from a pre-hook
    assert fuse_qkv(pruned) == 0
    mixed = _block()
    mixed.value.bias = None
    assert fuse_qkv(mixed) == 0
    assert fuse_qkv(_block(bias=False)) == 1
    gqa = nn.Module()
    gqa.q_proj, gqa.k_proj, gqa.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
    gqa.v_proj.to(torch.bfloat16)
    assert fuse_qkv(gqa) == 0


def test_deepcopy_and_unfuse() -> None:
    model, _ = load_backbone("tiny-bert")
    fuse_qkv(model)
    twin = copy.deepcopy(model)
    # the copy's query layer feeds the copy's key/value layers, not the original's
    attn = twin.encoder.layer[0].attention.self
    key, value, slot = attn.query.__dict__["_bitblend_group"]
    assert key is attn.key and value is attn.value
    assert attn.key.__dict__["_bitblend_slot"] is slot
    unfuse_qkv(twin)
    assert not any(isinstance(m, FusedQueryLinear | FusedSliceLinear) for m in twin.modules())


@pytest.mark.parametrize(("kernels", "precision"), [("auto", "bf16-mixed"), ("torch", "bf16-mixed"),
                                                    ("auto", "fp8-emulated")])  # fmt: skip
def test_trainer_model_is_fused_with_kernels_auto(kernels: str, precision: str) -> None:
    """convert_model (what the Trainer runs) fuses under kernels=auto, after the precision
    conversion: fp8-emulated's converted layers stay unfused and keep their fp8 matmuls."""
    recipe = make_recipe(
        "model.backbone=tiny-bert", f"model.kernels={kernels}", f"precision.recipe={precision}"
    )
    model, _, _ = build_model(recipe, load_data(recipe))
    convert_model(model, recipe, build_precision(recipe.precision, torch.device("cpu")))
    fused = [m for m in model.modules() if isinstance(m, FusedQueryLinear)]
    layers = model.backbone.config.num_hidden_layers
    assert len(fused) == (layers if kernels == "auto" and precision != "fp8-emulated" else 0)


def test_bf16_autocast_casts_the_input_once() -> None:
    """The point of fusing on CPU: one 16-bit copy of the block input, not three."""
    model, _ = load_backbone("tiny-bert")
    _no_dropout(model)
    ids = torch.randint(0, 100, (2, 9))

    def casts() -> int:
        from torch.profiler import profile

        with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    before = casts()
    fuse_qkv(model)
    after = casts()
    layers = model.config.num_hidden_layers
    # per block: two fewer activation casts, three weight casts become one cast of the
    # concatenated weight (and one of its bias)
    assert before - after == layers * (2 + 3 + 3 - 2)
