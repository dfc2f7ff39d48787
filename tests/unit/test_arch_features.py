"""Config-driven architecture features of the newer published models: MoE layer placement with an offset
(Qwen2-MoE / Llama 4 / OpenMoE), the sigmoid-gated shared expert (Qwen2-MoE) and q/k RMSNorm (Qwen3, OLMoE)."""
import dataclasses
import functools

import pytest
import torch

from tests.expert_ref import expert_ffn
from train.config import load_train_config
from train.model.attention import GroupedQueryAttention
from train.model.moe.layer import MoELayer


def _model_cfg(name, *overrides):
    return load_train_config([f"model={name}", *overrides]).model


@pytest.mark.parametrize("name,moe_layers", [
    ("llama4_maverick", list(range(1, 48, 2))),  # interleave_moe_layer_step 2: layers 1, 3, ..., 47
    ("openmoe_8b", [5, 11, 17, 23]),  # every 6th layer, the last of each group
    ("qwen3_30b_a3b", list(range(48))),
    ("deepseek_moe_16b", list(range(1, 28))),  # first_k_dense 1, offset 0: unchanged
])
def test_moe_layer_placement(name, moe_layers):
    cfg = _model_cfg(name)
    assert [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)] == moe_layers


def test_layer_offset_outside_the_period_is_an_error():
    cfg = _model_cfg("tiny_llama4", "model.moe.layer_offset=2")
    with pytest.raises(ValueError, match="layer_offset"):
        cfg.is_moe_layer(0)


def test_shared_expert_gate_scales_the_shared_output():
    cfg = _model_cfg("tiny_qwen15_moe")
    torch.manual_seed(0)
    gated = MoELayer(cfg.d_model, cfg.moe)
    plain = MoELayer(cfg.d_model, dataclasses.replace(cfg.moe, shared_expert_gate=False))
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("shared_gate.")})
    x = torch.randn(2, 5, cfg.d_model)
    x_TD = x.view(-1, cfg.d_model)
    shared_TD = gated.shared(x_TD)
    expected = plain(x)[0].view(-1, cfg.d_model) + (torch.sigmoid(gated.shared_gate(x_TD)) - 1) * shared_TD
    torch.testing.assert_close(gated(x)[0].view(-1, cfg.d_model), expected)
    assert gated.shared_gate.weight.shape == (1, cfg.d_model)


def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("kind", ["head", "full"])
def test_qk_norm(kind):
    cfg = _model_cfg("tiny_qwen3_moe", f"model.attention.qk_norm={kind}")
    torch.manual_seed(0)
    attn = GroupedQueryAttention(cfg)
    for n in (attn.q_norm, attn.k_norm):
        n.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, cfg.d_model)
    q, k, v = attn.qkv(x)
    H, Hkv, Dh, eps = attn.num_heads, attn.num_kv_heads, attn.head_dim, cfg.norm_eps
    q_raw, k_raw = attn.q_proj(x), attn.k_proj(x)
    if kind == "head":
        q_ref = _rms(q_raw.view(2, 3, H, Dh), attn.q_norm.weight, eps)
        k_ref = _rms(k_raw.view(2, 3, Hkv, Dh), attn.k_norm.weight, eps)
    else:
        q_ref = _rms(q_raw, attn.q_norm.weight, eps).view(2, 3, H, Dh)
        k_ref = _rms(k_raw, attn.k_norm.weight, eps).view(2, 3, Hkv, Dh)
    torch.testing.assert_close(q, q_ref.transpose(1, 2))
    torch.testing.assert_close(k, k_ref.transpose(1, 2))
    torch.testing.assert_close(v, attn.v_proj(x).view(2, 3, Hkv, Dh).transpose(1, 2))


def test_unknown_qk_norm_is_an_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):  # an enum in the schema: refused at composition
        _model_cfg("tiny_qwen3_moe", "model.attention.qk_norm=layer")
    cfg = _model_cfg("tiny_qwen3_moe")
    cfg.attention.qk_norm = "layer"  # a config built by hand is refused by the model's own validate()
    with pytest.raises(ValueError, match="qk_norm"):
        GroupedQueryAttention(cfg)


def test_logit_softcap_attention():
    from train.model.attention import attend, attention_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    scale = 8**-0.5
    # a cap far above the scores is plain causal attention
    torch.testing.assert_close(attend(q, k, v, scale, None, softcap=1e6), attend(q, k, v, scale, None))
    s = 5.0 * torch.tanh(q @ k.transpose(-1, -2) * scale / 5.0)
    s = s.masked_fill(~attention_mask(6, 6, 3, q.device), float("-inf"))
    torch.testing.assert_close(attend(q, k, v, scale, 3, softcap=5.0), s.softmax(-1) @ v)


def test_grok_block_norms_and_multipliers():
    from train.model import build_model

    cfg = _model_cfg("tiny_grok1")
    block = build_model(cfg).layers[0]
    assert block.post_norms and block.attn_post_norm.weight.shape == (cfg.d_model,)
    # the multipliers: embedding x m equals embedding weights x m; logits x o
    base = _model_cfg("tiny_mixtral", "model.num_layers=1")
    scaled = dataclasses.replace(base, embedding_multiplier=3.0, output_multiplier=0.5)
    torch.manual_seed(0)
    a = build_model(base)
    b = build_model(scaled)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, base.vocab_size, (2, 7))
    with torch.no_grad():
        a.embed.weight.mul_(3.0)
        torch.testing.assert_close(b(ids).logits, 0.5 * a(ids).logits)


def test_gelu_gated_experts():
    import torch.nn.functional as F

    from train.model.mlp import SwiGLU
    from train.model.moe.experts import GroupedExperts

    torch.manual_seed(0)
    x = torch.randn(5, 16)
    mlp = SwiGLU(16, 8, "gelu_tanh")
    ref = mlp.w_down(F.gelu(mlp.w_gate(x), approximate="tanh") * mlp.w_up(x))
    torch.testing.assert_close(mlp(x), ref)
    experts = GroupedExperts(2, 16, 8, "gelu_tanh")
    counts = torch.tensor([2, 3])
    y = experts(x, counts)
    gelu_tanh = functools.partial(F.gelu, approximate="tanh")
    torch.testing.assert_close(y[:2], expert_ffn(experts, 0, x[:2], gelu_tanh))
    with pytest.raises(ValueError, match="ffn_activation"):
        SwiGLU(16, 8, "relu")
    assert _model_cfg("grok1").ffn_activation == "gelu_tanh"


def test_chunked_attention_mask():
    from train.model.attention import attention_mask

    mask = attention_mask(6, 6, None, "cpu", chunk_size=3)
    expected = torch.tensor([[j <= i and j // 3 == i // 3 for j in range(6)] for i in range(6)])
    assert torch.equal(mask, expected)
    assert torch.equal(attention_mask(2, 6, None, "cpu", chunk_size=3), expected[4:])  # after a cache


def test_llama4_nope_layers_and_chunks():
    from train.model import build_model

    cfg = _model_cfg("tiny_llama4")
    attns = [block.attn for block in build_model(cfg).layers]
    assert [a.use_rope for a in attns] == [True, True, True, False]  # every 4th layer has no RoPE
    assert [a.chunk_size for a in attns] == [8192, 8192, 8192, None]  # chunked only where RoPE is
    assert [a.temperature is not None for a in attns] == [False, False, False, True]


def test_expert_input_scaling_needs_top1():
    cfg = _model_cfg("tiny_llama4", "model.moe.top_k=2")
    with pytest.raises(ValueError, match="expert_input_scaling"):
        MoELayer(cfg.d_model, cfg.moe)
