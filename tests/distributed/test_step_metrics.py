"""StepMetrics over two gloo ranks: sums, a real max, and counts averaged over ranks, each as declared."""
import pytest

from parallel import Mesh
from tests.distributed._spawn import run_distributed
from tests.unit.test_trainer_metrics import _out, _stats
from train.trainer.metrics import StepMetrics


def _two_ranks(rank, world_size):
    m = StepMetrics()
    m.add(_out(_stats(1, [6.0 - 4 * rank, 2.0], [4.0, 2.0])))
    m.maxes["moe/devices_per_token_max"] += 3 * rank  # rank 1 saw a token reach more devices
    r = m.finalize(Mesh(rank=rank, world_size=world_size))
    assert r["moe/devices_per_token_max"] == 5.0  # a real max over ranks
    assert r["moe/layer1/device_load_imbalance"] == pytest.approx(8 / 6)  # from the counts summed over ranks
    assert r["moe/layer1/tokens_per_expert"] == [2.0, 2.0, 1.0, 1.0]  # averaged over ranks
    assert r["moe/dropped_frac"] == 0.0 and r["loss"] == 0.0


def test_reductions_over_two_ranks():
    run_distributed(_two_ranks, 2)
