"""Parity with Hugging Face transformers, fp32 on CPU, for every exportable family.

(a) import: a randomly initialised tiny model built with transformers' own class, saved with save_pretrained,
    imported into moeforge, gives the same logits;
(b) export: a random moeforge tiny model saved as a checkpoint, exported, loaded with AutoModelForCausalLM,
    gives the same logits, and AutoTokenizer loads the exported tokenizer.

Weights are re-drawn with a larger spread than the init (norm scales and V3's expert bias included), so a
swapped or transposed tensor, a wrong norm or a different expert choice shows up in the logits. HF runs with
eager attention and the eager experts loop (not the grouped_mm kernel).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from train.checkpoint import load_model, mark_complete, save_model  # noqa: E402
from train.config import RopeScalingConfig, TrainConfig, load_train_config  # noqa: E402
from train.hf import HFConversionError, export_checkpoint, import_checkpoint  # noqa: E402
from train.model import MoETransformer  # noqa: E402

TOL = 1e-4
VOCAB = 320
HF_KW = dict(attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)

# ---- tiny HF configs (transformers' classes) ---------------------------------------------------------------

_DS_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                  max_position_embeddings=640, n_shared_experts=2, num_experts_per_tok=3)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 16,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}

HF_CASES = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, sliding_window=5,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "dbrx": lambda: transformers.DbrxConfig(
        vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
        attn_config={"kv_n_heads": 2, "clip_qkv": 0.6, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 6, "moe_top_k": 3},
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "deepseek_v2_q_lora_groups": lambda: transformers.DeepseekV2Config(
        **_DS_COMMON, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=2.0, rope_parameters=dict(_YARN)),
    "deepseek_v2_lite": lambda: transformers.DeepseekV2Config(
        **_DS_COMMON, q_lora_rank=None, n_routed_experts=8, topk_method="greedy",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_DS_COMMON, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # Qwen2-MoE (Qwen1.5-MoE): q/k/v bias, a gated shared expert, a dense first layer (mlp_only_layers).
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Qwen3-MoE: per-head q/k norm, head_dim != hidden / heads, MoE every 2nd layer (decoder_sparse_step).
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # OLMoE: q/k norm over the whole projection (GQA here, so k's norm is narrower).
    "olmoe": lambda: transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Llama 4 (Maverick-style: no q/k norm): MoE every 2nd layer, NoPE every 2nd layer with the temperature
    # (floor_scale 4 so it varies within 12 tokens), RoPE layers in chunks of 5, sigmoid top-1 scaling the input.
    "llama4": lambda: transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=1,
        interleave_moe_layer_step=2, use_qk_norm=False, no_rope_layer_interval=2, attention_chunk_size=5,
        attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

# ---- tiny moeforge configs (the tiny_* twins, shrunk further) -----------------------------------------------

_SMALL = ["model.vocab_size=320", "model.d_model=64", "model.num_layers=3", "model.dense_hidden=96",
          "model.max_seq_len=256"]
_MLA = ["model.attention.num_heads=4", "model.attention.num_kv_heads=4", "model.attention.kv_lora_rank=16",
        "model.attention.qk_nope_head_dim=16", "model.attention.qk_rope_head_dim=8",
        "model.attention.v_head_dim=16", "model.moe.num_experts=8", "model.moe.top_k=3",
        "model.moe.expert_hidden=32", "model.moe.first_k_dense=1",
        "model.rope.scaling.original_max_position_embeddings=16", "model.max_seq_len=640"]
OURS_CASES = {
    "mixtral": ["model=tiny_mixtral", *_SMALL, "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
                "model.attention.head_dim=16", "model.attention.sliding_window=5", "model.moe.num_experts=6",
                "model.moe.expert_hidden=48"],
    "mixtral_granular_tied": ["model=tiny_mixtral", *_SMALL, "model.attention.num_heads=4",
                              "model.attention.num_kv_heads=2", "model.attention.head_dim=16",
                              "model.moe.num_experts=4", "model.moe.expert_hidden=48", "model.moe.granularity=2",
                              "model.tie_embeddings=true"],
    # YaRN with mscale_all_dim 0: transformers' own mscale inference would differ, so the export must say it.
    "mixtral_yarn": ["model=tiny_mixtral", *_SMALL, "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
                     "model.attention.head_dim=16", "model.moe.num_experts=4", "model.moe.expert_hidden=32",
                     "model.max_seq_len=32"],
    "dbrx": ["model=tiny_dbrx", *_SMALL, "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
             "model.attention.head_dim=16", "model.attention.clip_qkv=0.6", "model.moe.num_experts=6",
             "model.moe.top_k=3", "model.moe.expert_hidden=32"],
    "deepseek_v2_q_lora_groups": ["model=tiny_deepseek_v2", *_SMALL, *_MLA, "model.attention.q_lora_rank=24",
                                  "model.moe.num_groups=4", "model.moe.topk_groups=2"],
    "deepseek_v2_lite": ["model=tiny_deepseek_v2", *_SMALL, *_MLA, "model.attention.q_lora_rank=null",
                         "model.moe.num_groups=1", "model.moe.topk_groups=1", "model.moe.routed_scaling_factor=1.0"],
    "deepseek_v3": ["model=tiny_deepseek_v3", *_SMALL, *_MLA, "model.attention.q_lora_rank=24",
                    "model.moe.num_groups=4", "model.moe.topk_groups=2", "model.mtp_depth=1"],
    # Device-limited routing over 4 routing groups, 2 allowed: V2's group_limited_greedy (n_group 4, topk_group 2).
    "deepseek_v2_device_limited": ["model=tiny_deepseek_v2", *_SMALL, *_MLA, "model.attention.q_lora_rank=24",
                                   "model.moe.num_groups=1", "model.moe.topk_groups=1", "model.moe.device_limit=2",
                                   "model.moe.routing_groups=4"],
    "qwen2_moe": ["model=tiny_qwen15_moe", *_SMALL, "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
                  "model.attention.head_dim=16", "model.moe.num_experts=6", "model.moe.expert_hidden=32",
                  "model.moe.num_shared_experts=2", "model.moe.first_k_dense=1"],
    "qwen3_moe": ["model=tiny_qwen3_moe", *_SMALL, "model.num_layers=4", "model.attention.num_heads=4",
                  "model.attention.num_kv_heads=2", "model.attention.head_dim=24", "model.moe.num_experts=6",
                  "model.moe.top_k=2", "model.moe.expert_hidden=32", "model.moe.layer_freq=2",
                  "model.moe.layer_offset=1"],
    "llama4": ["model=tiny_llama4", *_SMALL, "model.num_layers=4", "model.attention.num_heads=4",
               "model.attention.num_kv_heads=2", "model.attention.head_dim=16", "model.moe.num_experts=6",
               "model.moe.expert_hidden=32", "model.attention.nope_layer_interval=2", "model.attention.chunk_size=5",
               "model.attention.temperature_floor_scale=4"],
    "olmoe": ["model=tiny_olmoe", *_SMALL, "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
              "model.attention.head_dim=16", "model.moe.num_experts=6", "model.moe.top_k=3",
              "model.moe.expert_hidden=32"],
}


# Settings Hydra overrides cannot add to a null node, applied after composing.
CASE_EDITS = {
    "mixtral_yarn": lambda m: setattr(m.rope, "scaling", RopeScalingConfig(
        factor=4.0, original_max_position_embeddings=8, mscale=0.8, mscale_all_dim=0.0)),
}


def _input_ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


@torch.no_grad()
def _spread(named_tensors, seed: int) -> None:
    """Re-draw checkpointed tensors in place (state_dict entries share storage with the model; rotary tables
    are not among them): matrices N(0, 0.08²), 1-D scales 1 + N(0, 0.1²), expert biases N(0, 0.05²)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in named_tensors:
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if "bias" in name and t.dim() == 1:  # V3's expert selection bias (our expert_bias_E or HF's buffer)
            t.copy_(0.05 * noise)
        elif t.dim() == 1:
            t.copy_(1.0 + 0.1 * noise)
        else:
            t.copy_(0.08 * noise)


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _our_logits(model: MoETransformer, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _load_ours(ckpt) -> MoETransformer:
    cfg, state, _ = load_model(ckpt)
    model = MoETransformer(cfg.model)
    model.load_state_dict(state, strict=True)
    return model


def _tokenizer_dir(tmp_path):
    """A small byte-level BPE in HF format (the builtin tokenizer recipe)."""
    from train.data.tokenizer import train_byte_bpe

    texts = ["def forward(self, x):\n    return self.w(x)\n", "import torch\nprint('mixture of experts')\n"] * 50
    tok = train_byte_bpe(iter(texts), 300)
    out = tmp_path / "tok"
    tok.save_pretrained(str(out))
    return out


# ---- (a) HF -> moeforge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_import_matches_transformers(case, tmp_path):
    torch.manual_seed(0)
    hf_cfg = HF_CASES[case]()
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, **HF_KW)
    _spread(hf_model.state_dict().items(), seed=1)
    hf_model.save_pretrained(str(tmp_path / "hf"))

    ids = _input_ids()
    ref = _hf_logits(hf_model, ids)
    ckpt = import_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours = _load_ours(ckpt)
    assert ours.cfg.name == f"imported_{hf_cfg.model_type}"
    diff = (_our_logits(ours, ids) - ref).abs().max().item()
    print(f"import {case}: max abs diff {diff:.3e}")
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"


# ---- (b) moeforge -> HF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(OURS_CASES))
def test_export_matches_ours(case, tmp_path):
    cfg = load_train_config(OURS_CASES[case])
    CASE_EDITS.get(case, lambda m: None)(cfg.model)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    _spread(model.state_dict().items(), seed=2)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000001"
    save_model(ckpt, TrainConfig(model=cfg.model), model.state_dict(), _tokenizer_dir(tmp_path))
    mark_complete(ckpt)

    out = export_checkpoint(run, tmp_path / "hf")  # a run dir resolves to its newest checkpoint
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), **HF_KW)
    ids = _input_ids()
    diff = (_hf_logits(hf_model, ids) - _our_logits(model, ids)).abs().max().item()
    print(f"export {case}: max abs diff {diff:.3e}")
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.decode(tok("import torch")["input_ids"]) == "import torch"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_token_id

    if cfg.model.moe.uses_expert_bias:  # the random selection bias must matter, or the test proves nothing
        for name, buf in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
        assert (_hf_logits(hf_model, ids) - _our_logits(model, ids)).abs().max().item() > 100 * TOL

    # Round trip: importing the export gives back exactly the same tensors (MTP and expert bias included).
    _, back, _ = load_model(import_checkpoint(out, tmp_path / "back"))
    mine = model.state_dict()
    assert sorted(back) == sorted(mine)
    for k in mine:
        assert torch.equal(back[k], mine[k]), k


# ---- clear errors ------------------------------------------------------------------------------------------


def _save(tmp_path, overrides):
    cfg = load_train_config(overrides)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_model(ckpt, TrainConfig(model=cfg.model), MoETransformer(cfg.model).state_dict(), None)
    mark_complete(ckpt)
    return ckpt


def test_deepseek_moe_export_is_a_clear_error(tmp_path):
    ckpt = _save(tmp_path, ["model=tiny_deepseek_moe", "model.num_layers=2", "model.vocab_size=64"])
    with pytest.raises(HFConversionError, match="deepseek_moe.*no native transformers class.*mixtral"):
        export_checkpoint(ckpt, tmp_path / "hf")


def test_unrepresentable_setting_is_a_clear_error(tmp_path):
    ckpt = _save(tmp_path, ["model=tiny_mixtral", "model.num_layers=2", "model.vocab_size=64",
                            "model.moe.num_shared_experts=1"])
    with pytest.raises(HFConversionError, match="mixtral.*shared experts"):
        export_checkpoint(ckpt, tmp_path / "hf")


def test_device_limited_routing_exports_as_v2_groups_or_is_refused(tmp_path):
    limited = ["model.num_layers=2", "model.vocab_size=64", "model.moe.num_groups=1", "model.moe.topk_groups=1",
               "model.moe.device_limit=2", "model.moe.routing_groups=4"]
    out = export_checkpoint(_save(tmp_path / "v2", ["model=tiny_deepseek_v2", *limited]), tmp_path / "v2" / "hf")
    hf = json.loads((out / "config.json").read_text())
    assert (hf["n_group"], hf["topk_group"], hf["topk_method"]) == (4, 2, "group_limited_greedy")
    with pytest.raises(HFConversionError, match="deepseek_v3.*device_limit below moe.routing_groups"):
        export_checkpoint(_save(tmp_path / "v3", ["model=tiny_deepseek_v3", *limited]), tmp_path / "v3" / "hf")
    with pytest.raises(HFConversionError, match="mixtral.*device-limited routing is DeepSeek-V2's"):
        export_checkpoint(_save(tmp_path / "mx", ["model=tiny_mixtral", *limited[:2], "model.moe.device_limit=1",
                                                  "model.moe.routing_groups=2"]), tmp_path / "mx" / "hf")


def test_weight_shape_mismatch_is_a_clear_error(tmp_path):
    hf_cfg = HF_CASES["mixtral"]()
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 40  # config no longer matches the weights
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConversionError, match="does not match|shape"):
        import_checkpoint(tmp_path / "hf", tmp_path / "ours")


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(HFConversionError, match="llama.*Supported"):
        import_checkpoint(tmp_path / "hf", tmp_path / "ours")


# ---- configs and command line ------------------------------------------------------------------------------

# Values from the published config.json files (Hugging Face hub), which an export must reproduce.
PUBLISHED = {
    "mixtral_8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, router_aux_loss_coef=0.02,
                         sliding_window=None, tie_word_embeddings=False),
    "mixtral_8x22b": dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
                          num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                          max_position_embeddings=65536, router_aux_loss_coef=0.001),
    "dbrx": dict(d_model=6144, n_heads=48, n_layers=40, max_seq_len=32768, vocab_size=100352),
    "deepseek_v2": dict(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
                        num_attention_heads=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
                        n_group=8, topk_group=3, topk_method="group_limited_greedy", routed_scaling_factor=16.0,
                        q_lora_rank=1536, kv_lora_rank=512, first_k_dense_replace=1, norm_topk_prob=False,
                        vocab_size=102400, max_position_embeddings=163840, rms_norm_eps=1e-6),
    "deepseek_v2_lite": dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, num_attention_heads=16, n_routed_experts=64, n_shared_experts=2,
                             num_experts_per_tok=6, topk_method="greedy", q_lora_rank=None,
                             routed_scaling_factor=1.0, first_k_dense_replace=1),
    "deepseek_v3": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                        num_attention_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536,
                        first_k_dense_replace=3, num_nextn_predict_layers=1, vocab_size=129280,
                        scoring_func="sigmoid", topk_method="noaux_tc"),
}
_ROPE = {"dbrx": {"rope_theta": 500000.0}, "mixtral_8x7b": {"rope_theta": 1e6}, "mixtral_8x22b": {"rope_theta": 1e6},
         "deepseek_v2": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096},
         "deepseek_v3": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0}}
_ARCH_FIELDS = ("vocab_size", "d_model", "num_layers", "max_seq_len", "norm", "norm_eps", "dense_hidden",
                "tie_embeddings", "attention", "rope", "mtp_depth")
_MOE_FIELDS = ("num_experts", "top_k", "expert_hidden", "num_shared_experts", "scoring", "norm_topk_prob",
               "routed_scaling_factor", "num_groups", "topk_groups", "first_k_dense", "layer_freq")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_export_and_round_trip(name, tmp_path):
    """Each full-size config exports to its published config.json values and imports back unchanged."""
    from transformers import AutoConfig

    from train.hf.convert import flatten_granularity, module_for_family, published_config

    cfg = published_config(name)
    module = module_for_family(cfg.family)
    module.check_exportable(cfg)
    module.hf_config(flatten_granularity(cfg)).save_pretrained(str(tmp_path))
    hf = AutoConfig.from_pretrained(str(tmp_path))
    for key, value in PUBLISHED[name].items():
        assert getattr(hf, key) == value, key
    if name == "dbrx":
        assert hf.attn_config.clip_qkv == 8 and hf.ffn_config.moe_num_experts == 16
        assert hf.ffn_config.moe_top_k == 4 and hf.ffn_config.ffn_hidden_size == 10752
    for key, value in _ROPE.get(name, {}).items():
        assert hf.rope_parameters[key] == value, key

    back = published_config(module.BASE_CONFIG if isinstance(module.BASE_CONFIG, str)
                            else module.BASE_CONFIG[hf.model_type])
    module.model_config(hf, back)
    for f in _ARCH_FIELDS:
        if f == "attention" and cfg.attention.head_dim is None:
            back.attention.head_dim = None  # MLA has no single head_dim
        assert getattr(back, f) == getattr(cfg, f), f
    for f in _MOE_FIELDS:
        assert getattr(back.moe, f) == getattr(cfg.moe, f), f


def test_command_line(tmp_path):
    """scripts/convert_hf.py (train.tools.convert_hf) export and import, and a clear error (exit 1) for an
    unsupported family."""
    from train.tools import convert_hf as cli

    ckpt = _save(tmp_path, ["model=tiny_mixtral", "model.num_layers=2", "model.vocab_size=64"])
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    assert cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "COMPLETE").is_file()
    bad = _save(tmp_path / "moe", ["model=tiny_deepseek_moe", "model.num_layers=2", "model.vocab_size=64"])
    assert cli.main(["export", str(bad), str(tmp_path / "hf2")]) == 1


@pytest.mark.parametrize("name", ["tiny_grok1", "tiny_openmoe"])
def test_family_without_exact_hf_class_is_a_clear_error(name, tmp_path):
    # Grok-1 and OpenMoE have no transformers class.
    ckpt = _save(tmp_path, [f"model={name}", "model.vocab_size=64"])
    with pytest.raises(HFConversionError, match="cannot convert model family.*qwen2_moe.*olmoe"):
        export_checkpoint(ckpt, tmp_path / "hf")


@pytest.mark.parametrize("overrides,match", [
    (["model=tiny_qwen3_moe", "model.moe.num_shared_experts=1"], "qwen3_moe.*no shared expert"),
    (["model=tiny_qwen15_moe", "model.moe.shared_expert_gate=false"], "qwen2_moe.*gated shared expert"),
    (["model=tiny_olmoe", "model.attention.qk_norm=head"], "olmoe.*qk_norm='head'.*'full'"),
    (["model=tiny_qwen3_moe", "model.moe.layer_freq=2"], "qwen3_moe.*layer_offset=0 with layer_freq=2"),
])
def test_unrepresentable_qwen_olmoe_setting_is_a_clear_error(overrides, match, tmp_path):
    ckpt = _save(tmp_path, [*overrides, "model.num_layers=2", "model.vocab_size=64"])
    with pytest.raises(HFConversionError, match=match):
        export_checkpoint(ckpt, tmp_path / "hf")
