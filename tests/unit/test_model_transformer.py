"""MoETransformer: KV-cache decoding, MTP, losses and outputs, seeded init, meta-device construction."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from train.config import load_train_config
from train.model import KVCache, MoETransformer, build_model, new_kv_caches
from train.model.moe.layer import MoELayer


def _cfg(name, **overrides):
    cfg = load_train_config([f"model={name}"]).model
    for key, value in overrides.items():
        if key.startswith("attention."):
            cfg.attention = dataclasses.replace(cfg.attention, **{key.split(".", 1)[1]: value})
        else:
            setattr(cfg, key, value)
    return cfg


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tiny_mixtral", {"attention.sliding_window": 4}),
        ("tiny_dbrx", {}),
        ("tiny_deepseek_moe", {}),
        ("tiny_deepseek_v2", {"attention.q_lora_rank": None}),
        ("tiny_deepseek_v3", {}),
        ("tiny_grok1", {"attention.sliding_window": 4}),  # soft-capped scores with a windowed, offset mask
        ("tiny_qwen15_moe", {}),
        ("tiny_qwen3_moe", {}),
        ("tiny_olmoe", {}),
        ("tiny_llama4", {}),
    ],
)
def test_kv_cache_decoding_equals_full_forward(name, overrides):
    model = _model(_cfg(name, **overrides)).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        caches = new_kv_caches(model)
        chunks = [model(ids[:, :5], kv_caches=caches).logits, model(ids[:, 5:8], kv_caches=caches).logits]
        chunks += [model(ids[:, t : t + 1], kv_caches=caches).logits for t in range(8, 12)]
    assert all(isinstance(c, KVCache) and c.length == 12 for c in caches)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=1e-4)


def _batch(cfg, b=2, t=16, seed=2):
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def test_mtp_depth_zero_is_the_plain_model():
    cfg1 = _cfg("tiny_deepseek_v3")
    cfg0 = _cfg("tiny_deepseek_v3", mtp_depth=0)
    m1, m0 = _model(cfg1, seed=3), _model(cfg0, seed=3)
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    assert set(sd0) == {k for k in sd1 if not k.startswith("mtp.")}  # no extra parameters at depth 0
    for k, v in sd0.items():  # same seed, same main-model weights whatever the MTP depth
        torch.testing.assert_close(v, sd1[k], atol=0, rtol=0)
    ids, labels = _batch(cfg0)
    out0, out1 = m0(ids, labels), m1(ids, labels)
    # The MTP model without labels takes no MTP code path: the main model's logits are unchanged.
    torch.testing.assert_close(out0.logits, m1(ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(out0.logits, out1.logits, atol=0, rtol=0)
    torch.testing.assert_close(out0.lm_loss, out1.lm_loss, atol=0, rtol=0)
    assert out0.mtp_loss is None and out1.mtp_loss is not None
    assert torch.equal(out0.loss, out0.lm_loss + out0.aux_loss)
    torch.testing.assert_close(out1.loss, out1.lm_loss + out1.aux_loss + cfg1.mtp_loss_weight * out1.mtp_loss)


def test_mtp_module_is_moe_and_its_aux_terms_count():
    cfg = _cfg("tiny_deepseek_v3", mtp_depth=2)
    model = _model(cfg)
    idx = [i for i, _ in model.moe_layers()]
    assert idx == [i for i in range(cfg.num_layers + 2) if cfg.is_moe_layer(i)] and idx[-2:] == [4, 5]
    assert isinstance(model.mtp[0].block.ffn, MoELayer)
    ids, labels = _batch(cfg)
    out = model(ids, labels)
    assert [s["layer"] for s in out.moe_stats] == idx
    torch.testing.assert_close(out.aux_loss, sum(out.aux_terms.values()))
    # Depth k predicts labels shifted by k: with k past the sequence there is nothing left to predict.
    short_ids, short_labels = ids[:, :2], labels[:, :2]
    out_short = model(short_ids, short_labels)
    assert torch.isfinite(out_short.loss) and torch.isfinite(out_short.mtp_loss)


def test_mtp_loss_falls_on_repeated_batch():
    cfg = _cfg("tiny_deepseek_v3", vocab_size=512)  # a smaller head keeps 30 CPU steps around a second
    model = _model(cfg, seed=4)
    ids, labels = _batch(cfg, b=2, t=16, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    mtp_losses = []
    for _ in range(30):
        out = model(ids, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        mtp_losses.append(out.mtp_loss.item())
    assert mtp_losses[-1] < 0.5 * mtp_losses[0], mtp_losses


def test_lm_loss_ignores_minus_100_and_is_fp32_mean():
    cfg = _cfg("tiny_mixtral")
    model = _model(cfg)
    ids, labels = _batch(cfg)
    labels = labels.clone()
    labels[0, :5] = -100
    out = model(ids, labels)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(out.logits.float()[keep], labels[keep])
    torch.testing.assert_close(out.lm_loss, expected)
    assert model(ids, torch.full_like(labels, -100)).lm_loss.item() == 0.0


def test_init_is_seeded_and_covers_everything():
    cfg = _cfg("tiny_deepseek_v3")
    a, b = _model(cfg, seed=7), _model(cfg, seed=7)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=0, rtol=0, msg=k)
    assert not torch.equal(_model(cfg, seed=8).embed.weight, a.embed.weight)
    m = a.layers[0]
    assert torch.equal(m.attn_norm.weight, torch.ones_like(m.attn_norm.weight))
    assert abs(a.embed.weight.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    a.init_weights(11)
    b.init_weights(11)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_meta_build_then_materialise_matches_direct_build():
    cfg = _cfg("tiny_deepseek_v2", tie_embeddings=True)
    with torch.device("meta"):
        meta = build_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(5)
    direct = MoETransformer(cfg)
    direct.init_weights(5)
    assert meta.lm_head.weight is meta.embed.weight  # tying survives to_empty via init_weights
    for (k, va), vb in zip(meta.state_dict().items(), direct.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=0, rtol=0, msg=k)
    torch.testing.assert_close(meta.layers[0].attn.rope.inv_freq, direct.layers[0].attn.rope.inv_freq)
    ids, _ = _batch(cfg)
    torch.testing.assert_close(meta(ids).logits, direct(ids).logits)


def test_parameter_names():
    v3 = _model(_cfg("tiny_deepseek_v3"))
    keys = set(v3.state_dict())
    for k in ["embed.weight", "norm.weight", "lm_head.weight", "layers.0.attn_norm.weight", "layers.0.ffn_norm.weight",
              "layers.0.attn.q_a_proj.weight", "layers.0.attn.q_a_layernorm.weight", "layers.0.attn.q_b_proj.weight",
              "layers.0.attn.kv_a_proj_with_mqa.weight", "layers.0.attn.kv_a_layernorm.weight",
              "layers.0.attn.kv_b_proj.weight", "layers.0.attn.o_proj.weight", "layers.0.ffn.w_gate.weight",
              "layers.0.ffn.w_up.weight", "layers.0.ffn.w_down.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
              "mtp.0.eh_proj.weight", "mtp.0.norm.weight", "mtp.0.block.attn.kv_b_proj.weight"]:
        assert k in keys, k
    assert not any("rope" in k for k in keys)  # rotary tables are derived, never checkpointed
    mix = set(_model(_cfg("tiny_mixtral")).state_dict())
    assert {f"layers.1.attn.{p}_proj.weight" for p in "qkvo"} <= mix
