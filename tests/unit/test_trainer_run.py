"""Short in-process training runs: determinism, gradient accumulation, exact resume, metrics contents.

All runs share one small cache (a 1 MB corpus slice, a 512-token BPE) built once per session, and a model
shrunk to two layers so each run takes a second or two on CPU.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.small_runs import make_trainer, records, run

@pytest.fixture(scope="module")
def cache_dir(small_cache):
    return small_cache  # the session's (tests/conftest.py)


def test_same_seed_same_losses_bitwise(tmp_path, cache_dir):
    run(tmp_path / "a", cache_dir, "trainer.max_steps=3")
    run(tmp_path / "b", cache_dir, "trainer.max_steps=3")
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    c = run(tmp_path / "c", cache_dir, "trainer.max_steps=1", "trainer.seed=7")
    assert records(tmp_path / "c")[0]["loss"] != a[0]["loss"]
    assert c.state.step == 1


def test_accumulation_matches_one_big_micro_batch(tmp_path, cache_dir):
    # The balance terms are zeroed: the expert-balance loss multiplies batch statistics (the fraction of
    # tokens routed to each expert times the mean router probability), so its value on a whole batch is not
    # the mean of its values on quarter batches; every other term is a per-token mean, linear in the split.
    # optim.eps=1 makes AdamW's first update ~ lr·g instead of lr·sign(g): with the default eps, gradient
    # entries near zero flip sign under fp32 summation-order noise and move by 2·lr, which would hide (or
    # fake) a real mismatch. With a linear update, equal parameters mean equal gradients.
    common = ["trainer.max_steps=1", "trainer.global_batch_size=8", "model.moe.expert_balance_coef=0",
              "optim.eps=1.0", "optim.lr=1.0", "optim.warmup_steps=0"]
    one = make_trainer(tmp_path / "one", cache_dir, *common, "trainer.micro_batch_size=8")
    four = make_trainer(tmp_path / "four", cache_dir, *common, "trainer.micro_batch_size=2")
    assert one.data.grad_accum_steps == 1 and four.data.grad_accum_steps == 4
    for t in (one, four):
        t.fit()
        t.close()
    p1, p4 = dict(one.state.model.named_parameters()), dict(four.state.model.named_parameters())
    for name, p in p1.items():
        torch.testing.assert_close(p4[name], p, rtol=1e-5, atol=1e-7, msg=name)
    assert records(tmp_path / "one")[0]["loss"] == pytest.approx(records(tmp_path / "four")[0]["loss"], rel=1e-5)


def test_resume_is_exact(tmp_path, cache_dir):
    # tiny_deepseek_v3 exercises the expert-bias buffers, MTP and the sequence-wise balance term.
    common = ["model=tiny_deepseek_v3", "model.vocab_size=512", "model.num_layers=2", "trainer.max_steps=6",
              "trainer.save_every=3"]
    full = run(tmp_path / "full", cache_dir, *common)
    run(tmp_path / "split", cache_dir, *common, stop_at=3)  # a preempted run
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step_00000003"]
    resumed = run(tmp_path / "split", cache_dir, *common)  # trainer.resume=auto
    assert resumed.resumed_from.name == "step_00000003"

    ref, got = records(tmp_path / "full"), records(tmp_path / "split")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    sd_full, sd_resumed = full.state.model.state_dict(), resumed.state.model.state_dict()
    for name, t in sd_full.items():
        assert torch.equal(sd_resumed[name], t), name
    assert any("expert_bias" in n and t.abs().sum() > 0 for n, t in sd_full.items())
    for step in (3, 6):
        d = tmp_path / "split" / "checkpoints" / f"step_{step:08d}"
        for f in ("COMPLETE", "state/.metadata", "state/__0_0.distcp", "config.yaml", "train_state.pt",
                  "train_state_rank0.pt", "CHECKSUMS.json"):
            assert (d / f).exists(), (d, f)


def test_metrics_record_contents(tmp_path, cache_dir):
    trainer = run(tmp_path / "r", cache_dir, "model=tiny_deepseek_v3", "model.vocab_size=512",
                  "model.num_layers=3", "trainer.max_steps=2", "trainer.eval_every=2")
    recs = records(tmp_path / "r")
    assert [r["step"] for r in recs] == [1, 2]
    r = recs[-1]
    for key in ("loss", "lm_loss", "aux_loss", "mtp_loss", "tokens", "tokens_per_s", "mfu", "lr", "grad_norm",
                "val_loss", "aux/seq_balance", "moe/devices_per_token_max", "moe/devices_per_token_mean",
                "moe/a2a_tokens_sent", "moe/dropped_frac", "moe/device_load_imbalance", "moe/comm_imbalance"):
        assert key in r, key
    assert r["moe/device_load_imbalance"] == r["moe/comm_imbalance"] == 1.0  # one device
    assert r["tokens"] == 2 * 8 * 32
    moe_ids = [i for i, _ in trainer.state.model.moe_layers()]
    assert moe_ids == [1, 2, 3]  # first_k_dense=1, then the MTP block's MoE layer
    for i in moe_ids:
        assert len(r[f"moe/layer{i}/tokens_per_expert"]) == 16
        assert sum(r[f"moe/layer{i}/tokens_per_expert"]) == pytest.approx(8 * 32 * 4)  # tokens × top-k
        for k in ("load_min", "load_max", "load_cv", "bias_min", "bias_max", "bias_absmean", "device_load_imbalance"):
            assert f"moe/layer{i}/{k}" in r
    assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"] + 0.3 * r["mtp_loss"], rel=1e-6)
    assert r["aux_loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("aux/")), rel=1e-6)
    assert (tmp_path / "r" / "config.yaml").exists()


def test_init_from_loads_weights_only(tmp_path, cache_dir):
    src = run(tmp_path / "src", cache_dir, "trainer.max_steps=2")
    new = make_trainer(tmp_path / "new", cache_dir, "trainer.max_steps=2",
                       f"trainer.init_from={tmp_path / 'src'}")
    assert new.state.step == 0 and new.data.step == 0
    for name, t in src.state.model.state_dict().items():
        assert torch.equal(new.state.model.state_dict()[name], t), name
    new.close()


def test_routing_groups_are_resolved_into_config_yaml_and_kept_on_resume(tmp_path, cache_dir):
    from omegaconf import OmegaConf

    from train.trainer.validate import ConfigError

    run(tmp_path / "a", cache_dir, "trainer.max_steps=1", "model.moe.device_limit=1")
    for path in (tmp_path / "a" / "config.yaml", tmp_path / "a" / "checkpoints" / "step_00000001" / "config.yaml"):
        assert OmegaConf.load(path).model.moe.routing_groups == 1, path  # null resolved to this run's ep_size
    record = json.loads((tmp_path / "a" / "run_record.json").read_text())  # the run record holds it too
    assert record["routing_groups"] == 1 and record["world_size"] == 1 and record["grad_accum_steps"] >= 1

    common = ["trainer.max_steps=2", "trainer.save_every=1", "model.moe.device_limit=2"]
    run(tmp_path / "b", cache_dir, *common, "model.moe.routing_groups=4", stop_at=1)
    resumed = make_trainer(tmp_path / "b", cache_dir, *common)  # no routing_groups: the stored one, not ep_size 1
    assert resumed.resumed_from.name == "step_00000001"
    assert resumed.record.routing_groups == 4 and resumed.cfg.model.moe.routing_groups is None  # not written back
    assert all(layer.router.routing_groups == 4 for _, layer in resumed.state.model.moe_layers())
    resumed.close()
    with pytest.raises(ConfigError, match=r"model.moe.routing_groups=2 contradicts the checkpoint .*step_00000001"):
        make_trainer(tmp_path / "b", cache_dir, *common, "model.moe.routing_groups=2")


def test_save_never_overwrites_and_sets_leftovers_aside(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path / "r", cache_dir, "trainer.max_steps=2", "trainer.save_every=1")
    ckpts = tmp_path / "r" / "checkpoints"
    (ckpts / ".tmp_step_00000001").mkdir(parents=True)  # a save interrupted before the rename
    (ckpts / ".tmp_step_00000001" / "junk").write_text("x")
    (ckpts / "step_00000002").mkdir()  # a save interrupted between the rename and COMPLETE
    trainer.fit()
    trainer.close()
    assert (ckpts / "step_00000001" / "COMPLETE").is_file() and (ckpts / "step_00000002" / "COMPLETE").is_file()
    stale = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".stale_"))
    assert len(stale) == 2 and sum((ckpts / name / "junk").exists() for name in stale) == 1
    weights = (ckpts / "step_00000002" / "state" / "__0_0.distcp").stat().st_mtime_ns
    assert trainer.save() is None  # already complete: left untouched
    assert (ckpts / "step_00000002" / "state" / "__0_0.distcp").stat().st_mtime_ns == weights


def test_damaged_checkpoints_give_clear_errors_and_are_kept(tmp_path, cache_dir):
    from train.checkpoint import CheckpointError

    run(tmp_path / "r", cache_dir, "trainer.max_steps=2", "trainer.save_every=2")
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000002"
    weights = ckpt / "state" / "__0_0.distcp"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated by a full disk, say
    with pytest.raises(CheckpointError, match=r"every complete checkpoint .* damaged .*__0_0.distcp has \d+ "
                                              r"bytes, \d+ were saved \(truncated\?\)"):
        make_trainer(tmp_path / "r", cache_dir, "trainer.max_steps=4", "trainer.save_every=2")
    assert weights.read_bytes() == good[: len(good) // 2]  # nothing was overwritten

    weights.write_bytes(good)
    (ckpt / "train_state_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state_rank0.pt is missing"):
        make_trainer(tmp_path / "r", cache_dir, "trainer.max_steps=4", "trainer.save_every=2")


def test_resumed_run_continues_the_same_offline_wandb_run(tmp_path, cache_dir, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["trainer.max_steps=4", "trainer.save_every=2", "logging.wandb=offline"]
    first = run(tmp_path / "r", cache_dir, *common, stop_at=2)
    run_id = first.state.wandb_run_id
    assert run_id
    resumed = run(tmp_path / "r", cache_dir, *common)
    assert resumed.state.wandb_run_id == run_id
    offline_runs = sorted((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert offline_runs and all(p.name.endswith(run_id) for p in offline_runs)  # one run id, two sessions


def test_bf16_autocast_trains_with_fp32_master_weights_and_router(tmp_path, cache_dir):
    fp32 = run(tmp_path / "fp32", cache_dir, "trainer.max_steps=3")
    bf16 = run(tmp_path / "bf16", cache_dir, "trainer.max_steps=3", "precision=bf16_autocast")
    assert all(p.dtype == torch.float32 for p in bf16.state.model.parameters())  # master weights stay fp32
    ref, got = records(tmp_path / "fp32"), records(tmp_path / "bf16")
    for r_ref, r in zip(ref, got):
        assert r["lm_loss"] == pytest.approx(r_ref["lm_loss"], rel=2e-2)  # bf16 matmuls, same trajectory
        assert r["lm_loss"] != r_ref["lm_loss"]  # autocast really ran
    # Under autocast the router still scores in fp32 (its logits decide the top-k).
    model = bf16.state.model
    _, layer = next(iter(model.moe_layers()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.router(torch.randn(5, layer.router.gate.in_features))
    assert out.logits_TE.dtype == torch.float32 and out.topk_weights_TK.dtype == torch.float32
    del fp32


def test_consecutive_bad_steps_stop_the_run_with_the_last_good_weights(tmp_path, cache_dir):
    from train.checkpoint import iter_weights

    from train.trainer.health import TrainingStopped

    trainer = make_trainer(tmp_path / "r", cache_dir, "trainer.max_steps=10", "trainer.save_every=100",
                           "trainer.max_bad_steps=2")
    forward = trainer.state.engine.forward

    def poisoned_from_step_3(*args):
        out = forward(*args)
        if trainer.state.step >= 2:
            out.loss = out.loss * float("nan")
        return out

    trainer.state.engine.forward = poisoned_from_step_3
    good = {}

    def keep_weights(record, log=trainer.logger.log):
        if record["step"] == 2:
            good.update({k: v.clone() for k, v in trainer.state.model.state_dict().items()})
        log(record)

    trainer.logger.log = keep_weights
    with pytest.raises(TrainingStopped, match=r"2 consecutive non-finite steps \(steps 3-4, trainer.max_bad_steps=2; "
                                              r"non-finite gradients in: .*embed.weight.*\): stopped with the last good "
                                              r"weights saved in .*step_00000004"):
        trainer.fit()
    trainer.close()
    saved = dict(iter_weights(tmp_path / "r" / "checkpoints" / "step_00000004"))
    assert all(torch.equal(saved[k], good[k]) for k in saved)  # the skipped steps changed nothing
    lines = records(tmp_path / "r")
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if r.get("event") == "bad_step"] == [3, 4]
    assert all(r.get("skipped") for r in lines if r.get("step") in (3, 4) and "loss" in r)


def test_loss_spikes_are_events_not_skips():
    from train.trainer.health import StepHealth

    health = StepHealth(max_bad_steps=3)
    losses = [5.0, 5.1, 4.9, 5.0, 5.05, 4.95, 5.0, 5.02, 9.0, 5.0]
    events = [e for step, loss in enumerate(losses, 1) for e in health.observe({"step": step, "loss": loss})]
    assert [(e["event"], e["step"]) for e in events] == [("spike", 9)]
    assert health.consecutive_bad == 0 and not health.should_stop


@pytest.mark.parametrize("name", ["train_state.pt", "train_state_rank0.pt"])
def test_a_planted_payload_in_each_kind_of_pt_file_is_refused(tmp_path, cache_dir, name):
    """Checksums rewritten to match (an attacker can do that too): the weights_only loader is what refuses."""
    from tests.unit.test_checkpoint_safe_load import plant_payload
    from train.checkpoint import CheckpointError
    from train.checkpoint.checksums import write_checksums

    run(tmp_path / "r", cache_dir, "trainer.max_steps=1", "trainer.save_every=1")
    ckpt, marker = tmp_path / "r" / "checkpoints" / "step_00000001", tmp_path / "pwned"
    plant_payload(ckpt / name, marker)
    write_checksums(ckpt, skip=("COMPLETE",))
    with pytest.raises(CheckpointError, match=rf"{name} was refused: .*GLOBAL (posix|os)\.system"):
        make_trainer(tmp_path / "r", cache_dir, "trainer.max_steps=2", "trainer.save_every=1")
    assert not marker.exists()
