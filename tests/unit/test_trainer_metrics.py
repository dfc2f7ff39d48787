"""StepMetrics: per-device imbalance is computed from the step's summed counts, then maxed over layers."""
from types import SimpleNamespace

import pytest
import torch

from parallel import Mesh
from train.trainer.metrics import StepMetrics, reduction


def _stats(layer, load_G, received_G):
    load_G, received_G = torch.tensor(load_G), torch.tensor(received_G)
    return {"layer": layer, "tokens_per_expert_E": load_G.repeat_interleave(2) / 2, "dropped_frac": 0.0,
            "devices_per_token_mean": 1.0, "devices_per_token_max": 2.0, "a2a_tokens_sent": 0,
            "tokens_per_device_G": load_G, "tokens_received_per_device_G": received_G}


def _out(*stats):
    zero = torch.zeros(())
    return SimpleNamespace(loss=zero, lm_loss=zero, aux_loss=zero, aux_terms={}, moe_stats=list(stats))


def test_device_imbalance_uses_step_counts_and_max_over_layers():
    m = StepMetrics()
    # Layer 1: micro-batches skewed in opposite directions, balanced over the step.
    m.add(_out(_stats(1, [6.0, 2.0], [4.0, 2.0]), _stats(2, [3.0, 1.0], [3.0, 1.0])))
    m.add(_out(_stats(1, [2.0, 6.0], [2.0, 4.0]), _stats(2, [3.0, 1.0], [3.0, 1.0])))
    r = m.finalize(Mesh())
    assert r["moe/layer1/device_load_imbalance"] == pytest.approx(1.0)
    assert r["moe/layer2/device_load_imbalance"] == pytest.approx(1.5)
    assert r["moe/device_load_imbalance"] == pytest.approx(1.5)
    assert r["moe/comm_imbalance"] == pytest.approx(1.5)
    assert not any("/_" in k for k in r)  # the count vectors stay internal


def test_every_metric_declares_its_reduction():
    assert reduction("aux/z_loss") == "mean" and reduction("moe/devices_per_token_max") == "max"
    assert reduction("moe/layer3/tokens_per_expert") == "rank_mean"
    with pytest.raises(KeyError, match="declares no reduction"):
        StepMetrics()._add("moe/undeclared", 1.0)

