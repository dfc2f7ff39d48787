"""Every config in configs/ composes, every tiny model trains a step, every full-size model builds on meta."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from train.config import CONFIG_DIR, compose, load_train_config
from train.model import build_model

GROUPS = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in Path(CONFIG_DIR).iterdir()
          if d.is_dir() and d.name not in ("sweep", "hydra")}  # those set hydra.*: test_sweeps.py
MODELS = GROUPS["model"]
TINY = [m for m in MODELS if m.startswith("tiny_")]
FULL = [m for m in MODELS if not m.startswith("tiny_")]
# Options whose required value is empty in the group file (validation demands it); the test supplies one.
REQUIRED = {
    ("data", "files"): ["data.paths=[corpus/*.jsonl]"],
    ("data", "hf"): ["data.name=some/dataset", "data.tokenizer=some/tokenizer"],
}
# Published totals, parameters excluding MTP modules, in billions (model cards / papers).
PUBLISHED_B = {"mixtral_8x7b": 46.7, "mixtral_8x22b": 140.6, "dbrx": 132.0, "deepseek_moe_16b": 16.4,
               "deepseek_v2_lite": 15.7, "deepseek_v2": 236.0, "deepseek_v3": 671.0,
               # sources and active counts: tests/unit/test_summary.py PUBLISHED_TOTAL_ACTIVE_B
               "grok1": 314.0, "openmoe_8b": 8.7, "qwen15_moe_a27b": 14.3, "qwen2_57b_a14b": 57.0,
               "qwen3_30b_a3b": 30.5, "olmoe_1b_7b": 6.9, "llama4_maverick": 400.0}
# Published figures rounded more coarsely than 1% (see test_summary.py for why).
PUBLISHED_REL = {"openmoe_8b": 0.03}


def test_groups_are_discovered():
    assert {"model", "data", "optim", "precision", "parallel", "trainer", "logging"} <= set(GROUPS)
    routing = {"tiny_noisy_topk", "tiny_switch", "tiny_gshard", "tiny_st_moe", "tiny_expert_choice", "tiny_base",
               "tiny_hash"}  # routing-scheme twins of tiny_mixtral
    assert set(PUBLISHED_B) == set(FULL) and routing <= set(TINY)
    # every published family has a tiny twin that trains on CPU
    family = {m: load_train_config([f"model={m}"]).model.family for m in MODELS}
    assert {family[m] for m in FULL} <= {family[m] for m in TINY}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    raw = compose(overrides)
    assert not OmegaConf.missing_keys(raw), f"{group}={option} leaves {OmegaConf.missing_keys(raw)} unset"
    cfg = load_train_config(overrides)
    if group == "model":
        assert cfg.model.name == option


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "defaults":
                yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_file_values_survive_composition(group, option):
    # A group file is merged onto the typed schema: a value it writes must be the value the run gets. (A `???`
    # in a group file is silently replaced by the schema default, so a "mandatory" value would not be.)
    written = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml"))
    composed = OmegaConf.to_container(compose([f"{group}={option}"])[group])
    for key, value in _leaves(written):
        got = OmegaConf.select(OmegaConf.create(composed), key)
        assert got == value, f"{group}/{option}.yaml sets {key}={value!r} but the composed config has {got!r}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_forward_backward(name):
    cfg = load_train_config([f"model={name}"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.logits.shape == (2, 16, cfg.vocab_size) and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert (out.mtp_loss is not None) == (cfg.mtp_depth > 0)


@pytest.mark.parametrize("name", FULL)
def test_full_model_builds_on_meta_with_published_size(name):
    cfg = load_train_config([f"model={name}"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert main / 1e9 == pytest.approx(PUBLISHED_B[name], rel=PUBLISHED_REL.get(name, 0.01))
    assert len(model.mtp) == cfg.mtp_depth
