"""`torchrun -m train parallel.ep_size=E` on 4 CPU ranks follows the single-process loss curve of the same
command, and device-limited routing caps the devices per token and cuts the all-to-all traffic.

Two routing set-ups of tiny_deepseek_v3:
- as shipped (node-limited: 4 groups, top 2): used for ep_size=2 on 4 ranks (2 expert-data-parallel groups);
- ungrouped (`num_groups=1`): at ep_size=4 tokens then reach up to 4 devices, so `device_limit=2` is a real
  restriction (with the shipped groups = devices, a token already reaches at most 2 of the 4 ranks).
"""
from __future__ import annotations


import pytest

from tests.integration._runs import FAST_DATA, step_records, torchrun_cli, train_here

pytestmark = pytest.mark.slow

NUM_STEPS = 4
COMMON = ["model=tiny_deepseek_v3", f"trainer.max_steps={NUM_STEPS}", "trainer.global_batch_size=8",
          "trainer.micro_batch_size=2", "trainer.seq_len=32", "trainer.eval_every=0", "trainer.save_every=1000",
          "logging.progress=false", *FAST_DATA]
UNGROUPED = ["model.moe.num_groups=1", "model.moe.topk_groups=1"]
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Run dirs by name, each trained on first use (so each test pays only for the runs it needs); the one-process
    references in this process (`train_here`), the multi-rank runs through torchrun."""
    root = tmp_path_factory.mktemp("runs")
    done = {}

    def get(name: str, nproc: int, extra) -> list:
        if name not in done:
            overrides = [*COMMON, *extra, f"trainer.run_dir={root / name}"]
            if nproc == 1:
                train_here(overrides, cache)
            else:
                torchrun_cli(nproc, overrides, cache)
            done[name] = step_records(root / name)
        return done[name]

    get.root = root
    return get


def assert_follows(got, ref):
    assert [r["step"] for r in got] == list(range(1, NUM_STEPS + 1))
    for r_ref, r in zip(ref, got):
        for key in LOSS_KEYS:
            assert r[key] == pytest.approx(r_ref[key], abs=1e-4), (r["step"], key)
        assert r["tokens"] == r_ref["tokens"]


def test_ep4_on_4_ranks_follows_single_process(runs):
    ref = runs("ref_ungrouped", 1, UNGROUPED)
    got = runs("ep4", 4, ["parallel.ep_size=4", *UNGROUPED])
    assert_follows(got, ref)
    assert all(r["moe/a2a_tokens_sent"] == 0 for r in ref)
    assert max(r["moe/devices_per_token_max"] for r in got) > 2  # unrestricted tokens reach 3-4 ranks


def test_device_limit_caps_devices_and_all_to_all_traffic(runs):
    unlimited = runs("ep4", 4, ["parallel.ep_size=4", *UNGROUPED])
    limited = runs("ep4_m2", 4, ["parallel.ep_size=4", *UNGROUPED, "model.moe.device_limit=2"])
    assert [r["step"] for r in limited] == list(range(1, NUM_STEPS + 1))
    assert all(r["moe/devices_per_token_max"] <= 2 for r in limited)
    sent_limited = sum(r["moe/a2a_tokens_sent"] for r in limited)
    sent_unlimited = sum(r["moe/a2a_tokens_sent"] for r in unlimited)
    assert 0 < sent_limited < sent_unlimited

    # The run resolved its routing groups to its ep_size and stored them, so the checkpoint's model is
    # device-limited in one process too (train.generate, evaluation, a resume on fewer ranks).
    import torch

    from train.checkpoint import load_model
    from train.model import build_model

    cfg, state, _ = load_model(runs.root / "ep4_m2")
    assert (cfg.model.moe.device_limit, cfg.model.moe.routing_groups) == (2, 4)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    for _, layer in model.moe_layers():
        layer.num_devices = 4  # only the statistics read it: they count the run's 4 devices
    with torch.no_grad():
        out = model(torch.randint(0, cfg.model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)))
    assert max(s["devices_per_token_max"] for s in out.moe_stats) <= 2


def test_ep2_with_two_expert_data_parallel_groups_follows_single_process(runs):
    ref = runs("ref", 1, [])
    got = runs("ep2x2", 4, ["parallel.ep_size=2"])
    assert_follows(got, ref)
    assert all(r["moe/devices_per_token_max"] <= 2 for r in got)
    assert all(r["moe/a2a_tokens_sent"] > 0 for r in got)
