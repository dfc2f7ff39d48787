"""Sparse upcycling (train/upcycle.py): the upcycled model's first forward equals the dense model's under the
stated conditions (whole copies of the FFN chosen, gate weights summing to one, no noise, nothing dropped),
for plain (m = 1) and granular (m > 1) upcycling, from tiny random transformers Llama/Mistral folders and from a
dense checkpoint of ours; it trains from `trainer.init_from`; bad input is a clear error.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from train.checkpoint import load_model, mark_complete, save_model  # noqa: E402
from train.config import TrainConfig, load_train_config  # noqa: E402
from train.model import MoETransformer  # noqa: E402
from train.hf import HFConversionError  # noqa: E402
from train.upcycle import UpcycleError, equality_conditions, upcycle  # noqa: E402

TOL = 1e-5
VOCAB = 320
_HF = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256)
HF_CASES = {
    "llama": lambda **kw: transformers.LlamaConfig(**{**_HF, **kw}),
    "llama_tied": lambda **kw: transformers.LlamaConfig(**{**_HF, "tie_word_embeddings": True, **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{**_HF, "sliding_window": 5, **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{**_HF, **kw}),  # biases on q/k/v
}
SHAPES = {  # name -> overrides: plain upcycling, then granular (FFN width 96 cut in 2 and 3 slices)
    "m1_e4_k2": ["model.moe.num_experts=4", "model.moe.top_k=2"],
    "m2_e4_k2": ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.granularity=2"],
    "m3_e8_k1": ["model.moe.num_experts=8", "model.moe.top_k=1", "model.moe.granularity=3"],
}


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def hf_folder(path, case="llama", **kw):
    """A random tiny HF dense model saved in `path` (weights spread wider than the init, norms not all one);
    returns the model."""
    model = transformers.AutoModelForCausalLM.from_config(HF_CASES[case](**kw), attn_implementation="eager",
                                                         dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.copy_((1.0 if p.dim() == 1 else 0.0) + 0.08 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    return model.eval()


def our_logits(ckpt, ids):
    cfg, state, _ = load_model(ckpt)
    model = MoETransformer(cfg.model)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(ids).logits, cfg.model


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_first_forward_equals_the_dense_hf_model(case, shape, tmp_path):
    hf = hf_folder(tmp_path / "dense", case)
    upcycle(tmp_path / "dense", tmp_path / "moe", SHAPES[shape])
    ids = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    got, cfg = our_logits(tmp_path / "moe", ids)
    assert equality_conditions(cfg) == []
    assert cfg.family == "mixtral" and all(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    assert cfg.moe.num_routed_experts == cfg.moe.num_experts * cfg.moe.granularity
    assert (got - ref).abs().max().item() <= TOL


def test_conditions_are_needed(tmp_path):
    """Gate weights that do not sum to one, or noise, change the first forward (and are reported)."""
    hf = hf_folder(tmp_path / "dense")
    ids = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    shape = SHAPES["m2_e4_k2"]
    upcycle(tmp_path / "dense", tmp_path / "unnormed", [*shape, "model.moe.scoring=softmax_topk",
                                                        "model.moe.norm_topk_prob=false"])
    got, cfg = our_logits(tmp_path / "unnormed", ids)
    assert equality_conditions(cfg) and (got - ref).abs().max().item() > 1e-2
    upcycle(tmp_path / "dense", tmp_path / "noisy", shape, noise_std=0.01)
    got, cfg = our_logits(tmp_path / "noisy", ids)
    assert equality_conditions(cfg, 0.01)
    assert 1e-5 < (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    _, state, _ = load_model(tmp_path / "noisy")
    w = state["layers.0.ffn.experts.w_gate_up_EHD"]
    assert not torch.equal(w[0], w[2])  # copies of the same slice differ once noised


def test_router_is_fresh_and_shared_by_a_copys_slices(tmp_path):
    hf_folder(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", SHAPES["m3_e8_k1"], seed=3)
    cfg, state, _ = load_model(tmp_path / "moe")
    gate = state["layers.1.ffn.router.gate.weight"]  # (E, D), E = 8 copies x 3 slices
    assert gate.shape == (24, 64)
    assert torch.equal(gate[0], gate[2]) and not torch.equal(gate[0], gate[3])
    assert abs(gate.std().item() - cfg.model.init_std) < 0.3 * cfg.model.init_std


def _dense_ours(path, **model_kw) -> MoETransformer:
    """A random dense checkpoint of ours: tiny_mixtral with every layer before moe.first_k_dense."""
    cfg = load_train_config(["model=tiny_mixtral", "model.vocab_size=320", "model.num_layers=2",
                             "model.moe.first_k_dense=2", "model.dense_hidden=96", "model.moe.expert_hidden=96"])
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    model.init_weights(seed=5)
    save_model(path, TrainConfig(model=cfg.model), model.state_dict())
    mark_complete(path)
    return model.eval()


@pytest.mark.parametrize("shape", ["m1_e4_k2", "m2_e4_k2"])
def test_first_forward_equals_our_dense_model(shape, tmp_path):
    dense = _dense_ours(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", SHAPES[shape])
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
    got, cfg = our_logits(tmp_path / "moe", ids)
    assert cfg.moe.first_k_dense == 0 and (got - ref).abs().max().item() <= TOL


def test_a_trained_dense_run_of_ours_upcycles(tmp_path, small_cache):
    """A run dir of a dense model (every layer before moe.first_k_dense) holds sharded `state/` checkpoints: the
    newest is upcycled, with the run's tokenizer."""
    from tests.small_runs import run

    run(tmp_path / "run", small_cache, "model.moe.first_k_dense=2", "trainer.max_steps=2")
    upcycle(tmp_path / "run", tmp_path / "moe", SHAPES["m2_e4_k2"])
    cfg, state, tokenizer = load_model(tmp_path / "run")
    dense = MoETransformer(cfg.model)
    dense.load_state_dict(state, strict=True)
    ids = _ids(cfg.model.vocab_size)
    got, moe_cfg = our_logits(tmp_path / "moe", ids)
    with torch.no_grad():
        assert (got - dense.eval()(ids).logits).abs().max().item() <= TOL
    assert moe_cfg.moe.num_routed_experts == 8 and (tmp_path / "moe" / "tokenizer" / "tokenizer.json").is_file()


def test_keeping_some_layers_dense(tmp_path):
    """`model.moe.first_k_dense=1`: layer 0 stays the dense FFN, layer 1 is upcycled."""
    dense = _dense_ours(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", [*SHAPES["m1_e4_k2"], "model.moe.first_k_dense=1"])
    ids = _ids()
    got, cfg = our_logits(tmp_path / "moe", ids)
    with torch.no_grad():
        assert (got - dense(ids).logits).abs().max().item() <= TOL
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)


# ---- errors ------------------------------------------------------------------------------------------------


def test_moe_sources_are_refused(tmp_path):
    cfg = transformers.MixtralConfig(**{**_HF, "num_local_experts": 4})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "mixtral"))
    with pytest.raises(HFConversionError, match="already an MoE"):
        upcycle(tmp_path / "mixtral", tmp_path / "out")
    ours = load_train_config(["model=tiny_mixtral", "model.num_layers=2"]).model
    save_model(tmp_path / "ours_moe", TrainConfig(model=ours), MoETransformer(ours).state_dict())
    mark_complete(tmp_path / "ours_moe")
    with pytest.raises(UpcycleError, match=r"not a dense checkpoint: layers \[0, 1\] are MoE"):
        upcycle(tmp_path / "ours_moe", tmp_path / "out")


def test_unsupported_architectures_are_refused(tmp_path):
    transformers.Qwen2Config(**_HF, use_sliding_window=True).save_pretrained(str(tmp_path / "qwen2"))
    with pytest.raises(HFConversionError, match="use_sliding_window=true"):
        upcycle(tmp_path / "qwen2", tmp_path / "out")
    transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(HFConversionError, match="cannot upcycle HF model_type 'gpt2'"):
        upcycle(tmp_path / "gpt2", tmp_path / "out")
    transformers.LlamaConfig(**_HF, attention_bias=True).save_pretrained(str(tmp_path / "biased"))
    with pytest.raises(HFConversionError, match="attention_bias"):
        upcycle(tmp_path / "biased", tmp_path / "out")


@pytest.mark.parametrize("overrides, match", [
    (["model.moe.expert_hidden=48"], "shape mismatch: model.moe.expert_hidden=48 but the dense FFN is 96"),
    (["model.moe.granularity=5"], "granularity=5 must divide the dense FFN width 96"),
    (["model.d_model=32"], "model.d_model differs from the dense source"),
    (["model.moe.num_shared_experts=1"], "num_shared_experts"),
    (["model.moe.num_expert=4"], "bad model override"),
    (["trainer.max_steps=3"], "only model.\\* overrides"),
])
def test_bad_shapes_are_refused(overrides, match, tmp_path):
    hf_folder(tmp_path / "dense")
    with pytest.raises(UpcycleError, match=match):
        upcycle(tmp_path / "dense", tmp_path / "out", overrides)
    assert not (tmp_path / "out").exists()


# ---- training ----------------------------------------------------------------------------------------------


def test_init_from_an_upcycled_checkpoint_trains(tmp_path):
    """`trainer.init_from=OUT` as `python -m train` applies it (architecture from the checkpoint), six steps."""
    from parallel import Mesh
    from tests.small_runs import SMALL, records
    from train.trainer.init_from import apply_init_from
    from train.trainer.loop import Trainer
    from train.trainer.validate import validate_config

    hf_folder(tmp_path / "dense", vocab_size=512)  # SMALL's vocabulary and two layers
    upcycle(tmp_path / "dense", tmp_path / "moe", SHAPES["m2_e4_k2"])
    overrides = [*SMALL, f"data.cache_dir={tmp_path / 'cache'}", f"trainer.run_dir={tmp_path / 'run'}",
                 f"trainer.init_from={tmp_path / 'moe'}", "trainer.max_steps=6"]
    cfg = load_train_config(overrides)
    apply_init_from(cfg, overrides)
    assert cfg.model.moe.granularity == 2 and cfg.model.d_model == 64
    validate_config(cfg, world_size=1)
    trainer = Trainer(cfg, Mesh())
    trainer.fit()
    trainer.close()
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
