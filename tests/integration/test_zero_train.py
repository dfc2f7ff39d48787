"""`torchrun -m train parallel.zero_stage=Z` on 4 CPU ranks with ep_size=2 (each expert on 2 ranks): every
DeepSpeed stage trains through the real CLI, keeps the generated DeepSpeed config, and resumes exactly.

Resume: one 5-step run saves at steps 3 and 5; a copy of its run dir cut back to step 3 (checkpoint and
metrics) is resumed by re-running the same command, and must reproduce steps 4–5 and the final weights to the
last bit (same layout: DeepSpeed's optimizer partitions come back as they were saved, each rank's experts its own).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from train.checkpoint import iter_weights

from tests.integration._runs import FAST_DATA, REPO, env_for, step_records, torchrun_cli

pytestmark = pytest.mark.slow

STEPS = 5
COMMON = ["model=tiny_deepseek_v3", "model.num_layers=2", "model.d_model=64", "parallel.ep_size=2",
          f"trainer.max_steps={STEPS}", "trainer.global_batch_size=8", "trainer.micro_batch_size=1",
          "trainer.seq_len=32", f"trainer.eval_every={STEPS}", "trainer.save_every=3", "logging.progress=false",
          *FAST_DATA]
EXACT_KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm", "lr", "tokens", "moe/a2a_tokens_sent")


def torchrun4(overrides, cache) -> str:
    return torchrun_cli(4, [*COMMON, *overrides], cache)


def cut_back_to_step_3(src, dst):
    """A copy of run dir `src` as it was right after step 3 was saved."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_00000005")
    kept = [line for line in (dst / "metrics.jsonl").read_text().splitlines() if json.loads(line).get("step", 0) <= 3]
    (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_resumes_exactly(stage, tmp_path, cache):
    full = tmp_path / "full"
    torchrun4([f"parallel.zero_stage={stage}", f"trainer.run_dir={full}"], cache)
    ds_config = json.loads((full / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage and ds_config["gradient_accumulation_steps"] == 2
    ckpt = full / "checkpoints" / "step_00000003"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "state" / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "state").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]

    resumed = tmp_path / "resumed"
    cut_back_to_step_3(full, resumed)
    out = torchrun4([f"parallel.zero_stage={stage}", f"trainer.run_dir={resumed}"], cache)
    assert "resumed from" in out and "optimizer state starts fresh" not in out
    got, ref = step_records(resumed), step_records(full)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r, r_ref in zip(got[3:], ref[3:]):
        for key in EXACT_KEYS:
            assert r[key] == r_ref[key], (stage, r["step"], key)
    assert got[-1]["val_loss"] == ref[-1]["val_loss"]  # evaluation runs the (ZeRO-3: partitioned) model too
    if stage == 2:  # a rank's shard gone: the checksums catch it, one line
        damaged = tmp_path / "damaged"
        cut_back_to_step_3(full, damaged)
        (damaged / "checkpoints/step_00000003/state/__1_0.distcp").unlink()
        args = ["torchrun", "--standalone", "--nproc_per_node=4", "-m", "train", *COMMON,
                f"parallel.zero_stage={stage}", f"trainer.run_dir={damaged}"]
        proc = subprocess.run(args, cwd=REPO, env=env_for(cache), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        said = [line for line in proc.stderr.splitlines() if line.startswith("moeforge: ")]
        assert said and "state/__1_0.distcp is missing" in said[0] and "damaged" in said[0]
    final = "checkpoints/step_00000005"
    weights, weights_ref = dict(iter_weights(resumed / final)), dict(iter_weights(full / final))
    assert weights.keys() == weights_ref.keys()
    for name, w in weights.items():
        assert w.equal(weights_ref[name]), (stage, name)
