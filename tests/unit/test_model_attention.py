"""GQA and MLA: sliding window and clip_qkv semantics, and numerical parity with HF's attention modules."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from train.config import load_train_config
from train.model.attention import GroupedQueryAttention, attention_mask
from train.model.mla import MultiHeadLatentAttention


def _model_cfg(name, **attention):
    cfg = load_train_config([f"model={name}"]).model
    if attention:
        cfg.attention = dataclasses.replace(cfg.attention, **attention)
    return cfg


def _init(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return module


def _reference_attention(q_BHTD, k_BHTD, v_BHTD, scale, allowed_TT):
    """Plain softmax attention with an explicit boolean mask (True = attend)."""
    scores = (q_BHTD @ k_BHTD.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed_TT, float("-inf"))
    return scores.softmax(-1) @ v_BHTD


@pytest.mark.parametrize("window", [1, 3, 5, 100])
def test_sliding_window_equals_explicit_mask_reference(window):
    cfg = _model_cfg("tiny_mixtral", sliding_window=window)
    attn = _init(GroupedQueryAttention(cfg))
    x = torch.randn(2, 9, cfg.d_model)
    pos = torch.arange(9)
    q, k, v = attn.qkv(x)
    cos, sin = attn.rope(pos)
    from train.model.rope import apply_rotary

    q, k = apply_rotary(q, cos, sin, False), apply_rotary(k, cos, sin, False)
    rep = cfg.attention.num_heads // cfg.attention.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    allowed = (j <= i) & (j > i - window)  # Mixtral: i - window < j <= i
    o = _reference_attention(q, k, v, cfg.head_dim**-0.5, allowed)
    expected = attn.o_proj(o.transpose(1, 2).reshape(2, 9, -1))
    torch.testing.assert_close(attn(x, pos), expected, atol=1e-5, rtol=1e-5)


def test_attention_mask_with_cache_offset():
    m = attention_mask(2, 5, sliding_window=2, device="cpu")
    assert m.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


def test_clip_qkv_clamps_projections():
    cfg = _model_cfg("tiny_dbrx", clip_qkv=0.3)
    attn = _init(GroupedQueryAttention(cfg), std=0.5)
    x = torch.randn(2, 7, cfg.d_model)
    q, k, v = attn.qkv(x)
    for y in (q, k, v):
        assert y.abs().max().item() == pytest.approx(0.3)  # clamped, and large enough that the clamp bites
    unclipped = GroupedQueryAttention(_model_cfg("tiny_dbrx", clip_qkv=None))
    unclipped.load_state_dict(attn.state_dict())
    q0, _, _ = unclipped.qkv(x)
    torch.testing.assert_close(q, q0.clamp(-0.3, 0.3))


def _causal_additive_mask(t, window=None):
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
    return torch.zeros(t, t).masked_fill(~allowed, float("-inf"))[None, None]


def _hf_tables(rope_module, pos):
    cos, sin = rope_module(pos)
    return torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]


def test_gqa_matches_hf_mixtral_attention():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralAttention

    cfg = _model_cfg("tiny_mixtral", sliding_window=4)
    a = cfg.attention
    hf_cfg = MixtralConfig(hidden_size=cfg.d_model, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                           head_dim=cfg.head_dim, sliding_window=4)
    hf_cfg._attn_implementation = "eager"
    ours = _init(GroupedQueryAttention(cfg))
    hf = MixtralAttention(hf_cfg, 0)
    hf.load_state_dict({k: v for k, v in ours.state_dict().items()})
    x, pos = torch.randn(2, 10, cfg.d_model), torch.arange(10)
    y_hf, _ = hf(x, _hf_tables(ours.rope, pos), _causal_additive_mask(10, window=4))
    torch.testing.assert_close(ours(x, pos), y_hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_mla_matches_hf_deepseek_attention(family, q_lora_rank):
    import transformers

    hf_mod = {"deepseek_v2": transformers.models.deepseek_v2.modeling_deepseek_v2,
              "deepseek_v3": transformers.models.deepseek_v3.modeling_deepseek_v3}[family]
    Config = {"deepseek_v2": transformers.DeepseekV2Config, "deepseek_v3": transformers.DeepseekV3Config}[family]
    cfg = _model_cfg(f"tiny_{family}", q_lora_rank=q_lora_rank)
    a, s = cfg.attention, cfg.rope.scaling
    assert s is not None and s.mscale_all_dim  # exercise the YaRN softmax scale
    rope_parameters = {"rope_type": "yarn", "rope_theta": cfg.rope.theta, "factor": s.factor,
                       "original_max_position_embeddings": s.original_max_position_embeddings,
                       "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "mscale": s.mscale,
                       "mscale_all_dim": s.mscale_all_dim}
    hf_cfg = Config(hidden_size=cfg.d_model, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                    q_lora_rank=q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                    qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, attention_bias=False,
                    rope_parameters=rope_parameters, max_position_embeddings=cfg.max_seq_len)
    hf_cfg._attn_implementation = "eager"
    ours = _init(MultiHeadLatentAttention(cfg))
    hf = getattr(hf_mod, "DeepseekV2Attention" if family == "deepseek_v2" else "DeepseekV3Attention")(hf_cfg, 0)
    hf.load_state_dict(ours.state_dict())
    assert hf.scaling == pytest.approx(ours.scale, rel=1e-12)

    t = 12
    pos = torch.arange(t) + 3000  # far enough out that the YaRN-blended frequencies matter
    x = torch.randn(2, t, cfg.d_model)
    prefix = "DeepseekV2" if family == "deepseek_v2" else "DeepseekV3"
    pe = getattr(hf_mod, f"{prefix}RotaryEmbedding")(hf_cfg)(x, pos[None])
    y_hf, _ = hf(x, position_embeddings=pe, attention_mask=_causal_additive_mask(t))
    torch.testing.assert_close(ours(x, pos), y_hf, atol=1e-5, rtol=1e-5)
