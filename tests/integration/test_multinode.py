"""Two launcher processes on loopback (a two-node job in miniature) follow the single-process loss curve."""
import subprocess

import pytest

from parallel.ports import free_port
from tests.integration._runs import FAST_DATA, REPO, env_for, step_records, train_here

pytestmark = pytest.mark.slow

COMMON = ["model=tiny_deepseek_v3", "trainer.max_steps=3", "trainer.global_batch_size=4",
          "trainer.micro_batch_size=2", "trainer.seq_len=32", "trainer.eval_every=1000", "trainer.save_every=1000",
          "logging.progress=false", *FAST_DATA]


def _two_nodes(run_dir, cache, extra):
    """Start two torchrun launchers (node ranks 0 and 1, one process each) through launch/torchrun.sh."""
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        env = env_for(cache)
        env.update(NNODES="2", NODE_RANK=str(node_rank), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(["bash", "launch/torchrun.sh", *COMMON, *extra, f"trainer.run_dir={run_dir}"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    return step_records(run_dir)


def test_two_nodes_on_loopback_follow_single_process(tmp_path, cache):
    train_here([*COMMON, f"trainer.run_dir={tmp_path / 'ref'}"], cache)  # the one-process reference
    ref = step_records(tmp_path / "ref")

    got = _two_nodes(tmp_path / "ep2", cache, ["parallel.ep_size=2"])
    assert [r["step"] for r in got] == [1, 2, 3]
    for r_ref, r in zip(ref, got):
        assert r["lm_loss"] == pytest.approx(r_ref["lm_loss"], abs=1e-4)
        assert r["loss"] == pytest.approx(r_ref["loss"], abs=1e-4)
        assert r["tokens"] == r_ref["tokens"]
    assert max(r["moe/devices_per_token_max"] for r in got) == 2  # unrestricted routing reaches both nodes

    limited = _two_nodes(tmp_path / "ep2_m1", cache, ["parallel.ep_size=2", "model.moe.device_limit=1"])
    assert all(r["moe/devices_per_token_max"] <= 1 for r in limited)
    assert sum(r["moe/a2a_tokens_sent"] for r in limited) < sum(r["moe/a2a_tokens_sent"] for r in got)

    # DeepSpeed ZeRO-2 across the two launchers follows moeforge's own data parallelism (stage 0) above
    zero = _two_nodes(tmp_path / "ep2_zero2", cache, ["parallel.ep_size=2", "parallel.zero_stage=2"])
    for r_ref, r in zip(got, zero):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert r[key] == pytest.approx(r_ref[key], rel=1e-5, abs=1e-5), (r["step"], key)
