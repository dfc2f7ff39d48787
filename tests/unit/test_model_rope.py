"""RoPE layouts and YaRN tables against Hugging Face's DeepSeek/Mixtral functions and a direct transcription
of DeepSeek's reference YaRN code."""
from __future__ import annotations

import math

import pytest
import torch

from train.config.model import RopeConfig, RopeScalingConfig
from train.model.rope import RotaryEmbedding, apply_rotary, rope_inv_freq, softmax_mscale, yarn_get_mscale

m2 = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
m3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
mix = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")

V2_YARN = RopeScalingConfig(factor=40.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707)
POSITIONS = torch.tensor([0, 1, 2, 7, 100, 4095, 4096, 50_000, 163_839])


def _qk(dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, len(POSITIONS), dim, generator=g), torch.randn(2, 1, len(POSITIONS), dim, generator=g)


def _hf_tables(rope: RotaryEmbedding):
    """HF's full-width cos/sin (cat(freqs, freqs)) built from our half-width ones."""
    cos, sin = rope(POSITIONS)
    return torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]


@pytest.mark.parametrize("scaling", [None, V2_YARN])
def test_interleaved_matches_deepseek_v2_complex_and_v3_permuted(scaling):
    rope = RotaryEmbedding(16, RopeConfig(interleaved=True, scaling=scaling))
    q, k = _qk()
    cos, sin = rope(POSITIONS)
    q_ours, k_ours = apply_rotary(q, cos, sin, True), apply_rotary(k, cos, sin, True)

    # V2: complex multiplication of adjacent pairs, layout kept.
    freqs_cis = torch.polar(torch.full_like(cos, rope.mscale), torch.atan2(sin, cos))[None]
    q_v2, k_v2 = m2.apply_rotary_emb(q, k, freqs_cis)
    torch.testing.assert_close(q_ours, q_v2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_v2, atol=1e-5, rtol=1e-5)

    # V3: rotates the even/odd slices and returns them de-interleaved (evens first): same values permuted.
    cos_f, sin_f = _hf_tables(rope)
    q_v3, k_v3 = m3.apply_rotary_pos_emb_interleave(q, k, cos_f, sin_f)
    perm = torch.cat((torch.arange(0, 16, 2), torch.arange(1, 16, 2)))
    torch.testing.assert_close(q_ours[..., perm], q_v3, atol=0, rtol=0)
    torch.testing.assert_close(k_ours[..., perm], k_v3, atol=0, rtol=0)
    # So attention scores agree whichever layout is used.
    torch.testing.assert_close(q_ours @ k_ours.transpose(-1, -2), q_v3 @ k_v3.transpose(-1, -2), atol=1e-5, rtol=1e-5)


def test_halves_layout_matches_rotate_half():
    rope = RotaryEmbedding(16, RopeConfig(theta=1e6, interleaved=False))
    q, k = _qk()
    cos, sin = rope(POSITIONS)
    cos_f, sin_f = _hf_tables(rope)
    q_hf, k_hf = mix.apply_rotary_pos_emb(q, k, cos_f, sin_f)
    torch.testing.assert_close(apply_rotary(q, cos, sin, False), q_hf, atol=0, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin, False), k_hf, atol=0, rtol=0)


def _deepseek_reference_yarn(dim, base, factor, original_max, beta_fast, beta_slow, mscale, mscale_all_dim):
    """Direct transcription of DeepSeek's YaRN rotary embedding (inv_freq and cos/sin multiplier)."""

    def get_mscale(scale, m):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def correction_dim(rot):
        return (dim * math.log(original_max / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freq_inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    inv_freq_mask = 1.0 - ramp
    inv_freq = freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask
    return inv_freq, get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)


@pytest.mark.parametrize(
    "dim,scaling",
    [
        (64, V2_YARN),  # DeepSeek-V2
        (64, RopeScalingConfig(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)),
        (16, V2_YARN),  # tiny twins
        (64, RopeScalingConfig(factor=4.0, original_max_position_embeddings=2048, beta_fast=16, beta_slow=2,
                               mscale=1.0, mscale_all_dim=0.0)),  # HF would differ here (see rope.py)
    ],
)
def test_yarn_tables_match_deepseek_reference(dim, scaling):
    s = scaling
    ref_inv_freq, ref_mscale = _deepseek_reference_yarn(
        dim, 10000.0, s.factor, s.original_max_position_embeddings, s.beta_fast, s.beta_slow, s.mscale,
        s.mscale_all_dim,
    )
    inv_freq, mscale = rope_inv_freq(dim, 10000.0, s)
    torch.testing.assert_close(inv_freq, ref_inv_freq, atol=0, rtol=0)
    assert mscale == pytest.approx(ref_mscale, rel=1e-12)
    cos, sin = RotaryEmbedding(dim, RopeConfig(interleaved=True, scaling=s))(POSITIONS)
    freqs = POSITIONS.float()[:, None] * ref_inv_freq[None]
    torch.testing.assert_close(cos, freqs.cos() * ref_mscale, atol=0, rtol=0)
    torch.testing.assert_close(sin, freqs.sin() * ref_mscale, atol=0, rtol=0)


@pytest.mark.parametrize("mscale", [0.707, 1.0])
def test_yarn_matches_hf_deepseek_v3_rotary_and_softmax_scale(mscale):
    from transformers import DeepseekV3Config

    s = RopeScalingConfig(factor=40.0, original_max_position_embeddings=4096, mscale=mscale, mscale_all_dim=mscale)
    rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": s.factor, "beta_fast": s.beta_fast,
                       "beta_slow": s.beta_slow, "mscale": s.mscale, "mscale_all_dim": s.mscale_all_dim,
                       "original_max_position_embeddings": s.original_max_position_embeddings}
    hf_cfg = DeepseekV3Config(hidden_size=128, num_attention_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=32,
                              rope_parameters=rope_parameters, max_position_embeddings=163840)
    hf_rope = m3.DeepseekV3RotaryEmbedding(hf_cfg)
    ours = RotaryEmbedding(16, RopeConfig(interleaved=True, scaling=s))
    torch.testing.assert_close(ours.inv_freq, hf_rope.inv_freq, atol=0, rtol=0)
    cos_hf, sin_hf = hf_rope(torch.zeros(1, dtype=torch.float32), POSITIONS[None])
    cos, sin = _hf_tables(ours)
    torch.testing.assert_close(cos, cos_hf, atol=0, rtol=0)
    torch.testing.assert_close(sin, sin_hf, atol=0, rtol=0)
    hf_scale = m3.yarn_apply_mscale(hf_cfg.rope_parameters, 48**-0.5)
    assert 48**-0.5 * softmax_mscale(s) == pytest.approx(hf_scale, rel=1e-12)
    assert softmax_mscale(s) == pytest.approx(yarn_get_mscale(40.0, mscale) ** 2)


def test_no_scaling_is_plain_rope():
    inv_freq, mscale = rope_inv_freq(8, 500000.0, None)
    torch.testing.assert_close(inv_freq, 1.0 / 500000.0 ** (torch.arange(0, 8, 2).float() / 8))
    assert mscale == 1.0 and softmax_mscale(None) == 1.0
