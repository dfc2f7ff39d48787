"""Document masking (`MoETransformer.forward(document_ids=...)`): a packed row's documents give the logits each
document gives alone; without masking they do not; all-zero ids equal no ids; checkpointing keeps the gradients.

Models: tiny_mixtral with a 4-token window (GQA: window & document & causal), tiny_deepseek_v2 (MLA),
tiny_deepseek_v3 (MLA, MTP), tiny_llama4 with 4-token chunks and a NoPE temperature that varies over the
positions used here, tiny_grok1 (soft-capped scores). Shapes: B rows, T tokens, V vocabulary; fp32 throughout.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.activation_checkpointing import apply_activation_checkpointing
from train.config import load_train_config
from train.model import build_model, new_kv_caches
from train.model.documents import document_attention_mask, document_positions

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py

# Each model with the attention overrides that make its masking features act on 7- and 9-token documents.
MODELS = {
    "tiny_mixtral": {"sliding_window": 4},
    "tiny_deepseek_v2": {},
    "tiny_deepseek_v3": {},
    "tiny_llama4": {"chunk_size": 4, "temperature_floor_scale": 2.0},
    "tiny_grok1": {},
}
LEN_A, LEN_B = 7, 9  # A ends with its EOD token; B is the rest of the row


def _model(name: str, train: bool = False, seed: int = 0, **attention):
    cfg = load_train_config([f"model={name}"]).model
    cfg.attention = dataclasses.replace(cfg.attention, **attention)
    torch.manual_seed(seed)
    model = build_model(cfg)
    return model.train() if train else model.eval()


def _ids(model, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def _doc_ids(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def test_positions_restart_at_each_document():
    doc_BT = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1], [0] * 8])
    expected = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4, 5, 6], list(range(8))])
    assert torch.equal(document_positions(doc_BT), expected)


def test_mask_is_causal_windowed_chunked_and_within_documents():
    doc_BT = torch.tensor([[0, 0, 0, 1, 1, 1]])
    pos_BT = document_positions(doc_BT)
    block = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    expected = torch.block_diag(block, block)
    assert torch.equal(document_attention_mask(doc_BT, pos_BT, None)[0, 0], expected)
    windowed = expected & ~torch.tril(torch.ones(6, 6, dtype=torch.bool), diagonal=-2)
    assert torch.equal(document_attention_mask(doc_BT, pos_BT, 2)[0, 0], windowed)
    # chunks of 2 on the per-document positions 0 1 2 | 0 1 2: {0, 1}, {2} in each document
    chunk = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(document_attention_mask(doc_BT, pos_BT, None, 2)[0, 0], torch.block_diag(chunk, chunk))


@pytest.mark.parametrize("name", MODELS)
def test_packed_documents_equal_each_document_alone(name):
    model = _model(name, **MODELS[name])
    a_T, b_T = _ids(model, LEN_A, 1), _ids(model, LEN_B, 2)
    row_1T = torch.cat((a_T, b_T))[None]
    with torch.no_grad():
        packed = model(row_1T, document_ids=_doc_ids(LEN_A, LEN_B)[None]).logits
        unmasked = model(row_1T).logits
        alone_a, alone_b = model(a_T[None]).logits, model(b_T[None]).logits
    torch.testing.assert_close(packed[:, :LEN_A], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, LEN_A:], alone_b, atol=1e-5, rtol=0)
    assert (unmasked[:, LEN_A:] - alone_b).abs().max() > 1e-4  # B sees A without the mask


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_rows_with_different_boundaries(name):
    """Two rows cut differently (5 | 11 and 9 | 3 | 4): per-row positions differ across the batch."""
    model = _model(name, **MODELS[name])
    cuts = [(5, 11), (9, 3, 4)]
    docs = [[_ids(model, n, 10 * r + i) for i, n in enumerate(lengths)] for r, lengths in enumerate(cuts)]
    ids_BT = torch.stack([torch.cat(d) for d in docs])
    doc_BT = torch.stack([_doc_ids(*lengths) for lengths in cuts])
    assert not torch.equal(document_positions(doc_BT)[0], document_positions(doc_BT)[1])
    with torch.no_grad():
        packed_BTV = model(ids_BT, document_ids=doc_BT).logits
        for r, row_docs in enumerate(docs):
            alone_TV = torch.cat([model(d[None]).logits[0] for d in row_docs])
            torch.testing.assert_close(packed_BTV[r], alone_TV, atol=1e-5, rtol=0, msg=f"row {r}")


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_deepseek_v2"])
def test_one_document_per_row_equals_no_document_ids(name):
    """All-zero ids take the mask path; no ids take SDPA's `is_causal` path (no window here)."""
    model = _model(name)
    ids_BT = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model(ids_BT, document_ids=torch.zeros_like(ids_BT)).logits
        plain = model(ids_BT).logits
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=0)


def test_kv_caches_or_positions_with_document_ids_raise():
    model = _model("tiny_mixtral")
    ids_BT = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad(), pytest.raises(ValueError, match="document_ids"):
        model(ids_BT, kv_caches=new_kv_caches(model), document_ids=torch.zeros_like(ids_BT))
    with torch.no_grad(), pytest.raises(ValueError, match="document_ids"):
        model(ids_BT, positions=torch.arange(4), document_ids=torch.zeros_like(ids_BT))


def _grads(name: str, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = _model(name, train=True, **MODELS[name])
    apply_activation_checkpointing(model, mode)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    doc_BT = torch.stack([_doc_ids(5, 11), _doc_ids(9, 3, 4)])
    out = model(ids[:, :-1], ids[:, 1:], document_ids=doc_BT)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_checkpointing_keeps_gradients_with_document_ids(name, mode):
    ref_loss, ref_grads = _grads(name, "none")
    loss, grads = _grads(name, mode)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for key, g_ref in ref_grads.items():
        torch.testing.assert_close(grads[key], g_ref, rtol=1e-6, atol=1e-6 * g_ref.abs().max().item(), msg=key)
