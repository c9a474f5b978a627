"""Sequence packing (issue 17, item 4): full rows with EOS separators, per-document
positions and a block-diagonal mask, so a packed row computes what each document alone
computes (outputs and gradients), and padding carries no loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from bitblend.config.schema import IGNORE
from bitblend.data.modalities import EncodedSplit, collate
from bitblend.data.packing import Packer, pack, packed_labels, segment_positions
from bitblend.models import attention
from bitblend.models.packed import backbone_mask, document_mask
from bitblend.tasks.losses import compute_loss

EOS = 0


def test_rows_are_full_eos_separated_and_lose_no_token() -> None:
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15], [16, 17]]
    rows = list(pack(docs, 6, EOS))
    ids = [r for r, _ in rows]
    assert [len(r) for r in ids] == [6, 6, 5]  # only the last row is short
    flat = [t for r in ids for t in r]
    assert flat == [t for d in docs for t in (*d, EOS)]
    # Segments: documents within a row, 1-based; a document cut by a row end starts the
    # next row as a new segment.
    assert rows[0][1] == [1, 1, 1, 1, 2, 2]
    assert rows[1][1] == [1, 1, 1, 1, 1, 1]
    assert rows[2][1] == [1, 1, 2, 2, 2]


def test_packer_state_resumes_mid_row() -> None:
    docs = [list(range(1, 1 + n)) for n in (3, 5, 2, 9, 4, 1, 7)]
    straight = list(pack(docs, 8, EOS))
    a = Packer(8, EOS)
    rows = [r for d in docs[:3] for r in a.feed(d)]
    b = Packer(8, EOS)
    b.load_state_dict(a.state_dict())
    rows += [r for d in docs[3:] for r in b.feed(d)] + list(b.flush())
    assert rows == straight


def test_positions_restart_per_document_and_padding_has_no_loss() -> None:
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    ids = torch.arange(10, 18).unsqueeze(0)
    labels = packed_labels(ids, seg)
    # Each document's first token is not predicted (it would be, from the previous one's
    # EOS, across the boundary); padding is never a label.
    assert labels.tolist() == [[IGNORE, 11, 12, IGNORE, 14, IGNORE, IGNORE, IGNORE]]


def test_collate_packs_pads_and_loss_ignores_padding() -> None:
    rows = list(pack([[3, 4, 5], [6, 7], [8, 9, 10, 11]], 5, EOS))
    split = EncodedSplit(
        head="causal_lm",
        targets=np.zeros(0),
        lengths=np.array([len(r) for r, _ in rows]),
        ids=[r for r, _ in rows],
        segments=[s for _, s in rows],
    )
    batch = collate(split, np.arange(len(rows)), pad_id=99, multiple=1)
    assert batch["segment_ids"][-1].tolist() == [1, 1, 0, 0, 0]  # [10, 11, EOS] + 2 pads...
    logits = torch.randn(*batch["input_ids"].shape, 100)
    base = compute_loss("cross_entropy", logits, batch["labels"], "causal_lm")
    # Anything at padded positions (their ids, their logits) leaves the loss unchanged.
    pads = batch["attention_mask"] == 0
    logits2 = logits.clone()
    logits2[pads] = torch.randn(int(pads.sum()), 100) * 50
    assert torch.equal(base, compute_loss("cross_entropy", logits2, batch["labels"], "causal_lm"))


def _llama(attn: str) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, attn_implementation=attn)  # fmt: skip
    return LlamaModel(cfg)


def _gpt2(attn: str) -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=50, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation=attn)  # fmt: skip
    return GPT2Model(cfg)


def _bert(attn: str) -> torch.nn.Module:
    cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation=attn)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False)


@pytest.mark.parametrize(
    ("build", "causal", "attn"),
    [(_llama, True, attention.NAME), (_llama, True, "sdpa"), (_llama, True, "eager"),
     (_gpt2, True, attention.NAME), (_gpt2, True, "sdpa"),
     (_bert, False, attention.NAME), (_bert, False, "sdpa")],
)  # fmt: skip
def test_packed_row_equals_each_document_alone(build, causal: bool, attn: str) -> None:  # type: ignore[no-untyped-def]
    """Hidden states and parameter gradients of a packed batch (two rows, one padded) equal
    those of its documents run one by one."""
    attention.register()
    torch.manual_seed(0)
    model = build(attn).eval()  # no dropout: both sides compute the same function
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 50, (n,), generator=gen).tolist() for n in (5, 9, 3, 7, 4)]
    rows = list(pack(docs, 12, EOS))
    seq = 12
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    seg = torch.zeros(len(rows), seq, dtype=torch.long)
    for j, (r, s) in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        seg[j, : len(s)] = torch.tensor(s)
    assert (seg == 0).any()  # the last row is padded
    probe = torch.randn(seq * len(rows), 64, generator=gen)  # fixed weights for a scalar loss

    out = model(
        input_ids=ids,
        attention_mask=backbone_mask(model, seg, causal),
        position_ids=segment_positions(seg),
    ).last_hidden_state
    real = seg > 0
    loss = (out[real] * probe[: int(real.sum())]).sum()
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # The same documents (with their EOS, cut at the same row ends) one at a time.
    pieces = []
    for j in range(len(rows)):
        for s in seg[j].unique().tolist():
            if s:
                pieces.append(ids[j][seg[j] == s])
    alone = [model(input_ids=p.unsqueeze(0)).last_hidden_state[0] for p in pieces]
    ref = torch.cat(alone)
    torch.testing.assert_close(out[real], ref, rtol=1e-4, atol=1e-5)
    (ref * probe[: ref.shape[0]]).sum().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            # fp32 sums in another order: tolerance relative to the tensor's largest entry.
            # (A key bias has a zero gradient mathematically: only noise to compare there.)
            scale = max(float(p.grad.abs().max()), 0.1)
            torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-5 * scale)


def test_without_the_block_mask_documents_would_leak() -> None:
    """The check above can fail: a plain causal mask over the packed row differs."""
    torch.manual_seed(0)
    model = _llama("sdpa").eval()
    ids = torch.tensor([[5, 6, 7, EOS, 8, 9, 10, EOS]])
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]])
    packed = model(input_ids=ids, attention_mask=document_mask(seg, True),
                   position_ids=segment_positions(seg)).last_hidden_state  # fmt: skip
    plain = model(input_ids=ids).last_hidden_state
    alone = model(input_ids=ids[:, 4:]).last_hidden_state
    torch.testing.assert_close(packed[:, 4:], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain[:, 4:], alone, atol=1e-3)


def _long_llama(attn: str) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=512, attn_implementation=attn)  # fmt: skip
    return LlamaModel(cfg)


def test_bitblend_kernel_runs_grouped_heads_in_causal_blocks() -> None:
    """Packed rows longer than a causal block (300 tokens: blocks of 128) with grouped k/v
    heads (6 over 2): bitblend's kernel (grouped queries stacked per k/v head, scores
    above the diagonal's blocks skipped) equals SDPA with the block mask, in outputs and
    parameter gradients, a padded row included."""
    attention.register()
    assert attention.CAUSAL_BLOCK < 300
    torch.manual_seed(0)
    ours, ref = _long_llama(attention.NAME), _long_llama("sdpa")
    ref.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (2, 300), generator=gen)
    seg = torch.ones(2, 300, dtype=torch.long)
    seg[0, 90:] = 2
    seg[0, 250:] = 3
    seg[1, 280:] = 0
    pos = segment_positions(seg)
    probe = torch.randn(2, 300, 48, generator=gen)
    outs, grads = [], []
    for model in (ours, ref):
        out = model(input_ids=ids, attention_mask=document_mask(seg, True),
                    position_ids=pos).last_hidden_state  # fmt: skip
        (out * probe)[seg > 0].sum().backward()
        outs.append(out[seg > 0].detach())
        grads.append({n: q.grad for n, q in model.named_parameters() if q.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        # fp32 sums over 580 tokens: the two kernels add in different orders
        torch.testing.assert_close(g, grads[1][name], rtol=1e-3, atol=2e-4)


def test_an_encoder_without_is_causal_is_not_run_in_causal_blocks() -> None:
    """Some encoders' attention modules carry no `is_causal` (Splinter, LayoutLM, ...).
    Given their bidirectional mask, a row longer than a causal block must still see every
    key of its document: only a model that declares itself causal is run in blocks."""
    attention.register()
    torch.manual_seed(0)

    def bert(attn: str) -> torch.nn.Module:
        cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=512, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, attn_implementation=attn)  # fmt: skip
        return BertModel(cfg, add_pooling_layer=False).eval()

    ours, ref = bert(attention.NAME), bert("sdpa")
    ref.load_state_dict(ours.state_dict())
    for m in ours.modules():
        if "is_causal" in vars(m):
            del m.is_causal
    ids = torch.randint(1, 50, (1, 300), generator=torch.Generator().manual_seed(2))
    seg = torch.ones(1, 300, dtype=torch.long)
    seg[0, 200:290] = 2
    seg[0, 290:] = 0
    a = ours(input_ids=ids, attention_mask=backbone_mask(ours, seg, False)).last_hidden_state
    b = ref(input_ids=ids, attention_mask=document_mask(seg, False)).last_hidden_state
    torch.testing.assert_close(a[seg > 0], b[seg > 0], rtol=1e-4, atol=1e-5)
