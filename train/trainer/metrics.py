"""One optimizer step's metrics: accumulate each micro-batch's outputs, reduce once over ranks, flatten.

Every accumulated value declares its reduction in `REDUCTIONS` (`world` = all ranks, `micro` = micro-batches of
the step); a value without one is an error, not a silent sum:
- `mean`: mean over micro and world: the losses (`loss`, `lm_loss`, `aux_loss`, `aux/<term>`, `mtp_loss`);
- `sum`: sum over layers, micro and world: `moe/a2a_tokens_sent` (token copies sent in the whole step), and the
  per-device counts behind the imbalance ratios;
- `max`: max over layers, micro and world: `moe/devices_per_token_max`;
- `layer_mean`: mean over layers, micro and world: `moe/dropped_frac`, `moe/devices_per_token_mean`;
- `rank_mean`: summed over micro, averaged over ranks: `moe/layer{i}/tokens_per_expert`. The model's counts
  already cover the data-parallel world (its `count_reducer`), so they are equal on every rank; if a layer
  reports local counts the mean is the per-rank load, same shape of imbalance.
Derived from the reduced counts, never from per-micro ratios:
- `moe/layer{i}/load_min|load_max` are the least and most loaded expert relative to the even share
  (1.0 = balanced), `load_cv` the coefficient of variation of the counts;
- `moe/layer{i}/device_load_imbalance`: max/mean over expert-parallel devices of the token copies each device's
  experts process in the step (1.0 = balanced, and with one device); `moe/device_load_imbalance` and
  `moe/comm_imbalance` (max/mean of the tokens sent to each device, a token counted once per device) are the
  maxima over layers.
- `moe/layer{i}/bias_min|bias_max|bias_absmean`: the selection bias after this step's update (bias balancing).
All sums travel in one float64 all-reduce and all maxima in one more.
"""
from __future__ import annotations

from collections import OrderedDict
from fnmatch import fnmatchcase
from typing import Iterable, Optional

import torch

import parallel

# name pattern → reduction (see the module docstring); `moe/_*` values are internal and never recorded
REDUCTIONS = {
    "loss": "mean", "lm_loss": "mean", "aux_loss": "mean", "aux/*": "mean", "mtp_loss": "mean",
    "moe/a2a_tokens_sent": "sum",
    "moe/devices_per_token_max": "max",
    "moe/dropped_frac": "layer_mean", "moe/devices_per_token_mean": "layer_mean",
    "moe/layer*/tokens_per_expert": "rank_mean",
    "moe/layer*/_tokens_per_device": "sum", "moe/layer*/_tokens_received_per_device": "sum",
    "moe/_layer_samples": "sum",
}


def reduction(key: str) -> str:
    """The declared reduction of `key` (the first matching pattern of `REDUCTIONS`)."""
    for pattern, how in REDUCTIONS.items():
        if fnmatchcase(key, pattern):
            return how
    raise KeyError(f"metric {key!r} declares no reduction; add it to REDUCTIONS in train/trainer/metrics.py")


def imbalance(counts: torch.Tensor) -> float:
    """max / mean of a count vector (1.0 = balanced)."""
    return float(counts.max() / counts.mean().clamp_min(1e-9))


def load_balance(counts_E: torch.Tensor) -> dict:
    """The least and most loaded expert relative to the even share, and the coefficient of variation."""
    mean = counts_E.mean().clamp_min(1e-9)
    return {"load_min": float(counts_E.min() / mean), "load_max": float(counts_E.max() / mean),
            "load_cv": float(counts_E.std(unbiased=False) / mean)}


def _as_vector(value, device: torch.device) -> torch.Tensor:
    """A detached float64 vector on `device` (no host sync: values stay on the device until `finalize`)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).to(device=device, dtype=torch.float64)
    return torch.tensor([float(value)], dtype=torch.float64, device=device)


def _reduce_over_ranks(values: "OrderedDict[str, torch.Tensor]", mesh, op: str) -> dict:
    """Each vector of `values` reduced by `op` over ranks, all in one collective and one host read-back."""
    keys = list(values)
    if not keys:
        return {}
    flat = torch.cat([values[k] for k in keys]).to(mesh.device)
    flat = parallel.all_reduce_stats(flat, mesh, op=op).cpu()
    reduced, offset = {}, 0
    for k in keys:
        n = values[k].numel()
        reduced[k] = flat[offset:offset + n]
        offset += n
    return reduced


def _align_keys(values: "OrderedDict[str, torch.Tensor]", mesh, fill: float) -> None:
    """Give `values` every key any rank holds, in one order on all ranks (missing ones filled with `fill`), so the
    ranks of different pipeline stages can reduce them in one collective."""
    shapes = {k: v.numel() for k, v in values.items()}
    union: dict = {}
    for part in parallel.gather_objects(shapes, mesh):
        for k, n in part.items():
            union.setdefault(k, n)
    own = dict(values)
    values.clear()
    for k in sorted(union):
        values[k] = own[k] if k in own else torch.full((union[k],), fill, dtype=torch.float64, device=mesh.device)


class StepMetrics:
    """Accumulates the `ModelOutput`s of one step's micro-batches on this rank (on `device`)."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self.num_micro = 0
        self.sums: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.maxes: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def _add(self, key: str, value) -> None:
        """Fold `value` into `key` over micro-batches and layers: a running max or a running sum, as declared.
        None (a loss this pipeline stage does not compute) adds nothing."""
        if value is None:
            return
        v = _as_vector(value, self.device)
        if reduction(key) == "max":
            self.maxes[key] = torch.maximum(self.maxes[key], v) if key in self.maxes else v
        else:
            self.sums[key] = self.sums[key] + v if key in self.sums else v

    def add(self, out) -> None:
        """Fold in one micro-batch's output (detached values only; no graph is kept)."""
        self.num_micro += 1
        self._add("loss", out.loss)
        self._add("lm_loss", out.lm_loss)
        self._add("aux_loss", out.aux_loss)
        for name, term in (out.aux_terms or {}).items():
            self._add(f"aux/{name}", term)
        if getattr(out, "mtp_loss", None) is not None:
            self._add("mtp_loss", out.mtp_loss)
        stats = list(out.moe_stats or [])
        for position, s in enumerate(stats):
            layer_id = s.get("layer", position)
            self._add(f"moe/layer{layer_id}/tokens_per_expert", s["tokens_per_expert_E"])
            self._add("moe/dropped_frac", s["dropped_frac"])
            self._add("moe/devices_per_token_mean", s["devices_per_token_mean"])
            self._add("moe/a2a_tokens_sent", s.get("a2a_tokens_sent", 0))
            self._add("moe/devices_per_token_max", s["devices_per_token_max"])
            if "tokens_per_device_G" in s:
                self._add(f"moe/layer{layer_id}/_tokens_per_device", s["tokens_per_device_G"])
                self._add(f"moe/layer{layer_id}/_tokens_received_per_device", s["tokens_received_per_device_G"])
        if stats:
            self._add("moe/_layer_samples", len(stats))

    def finalize(self, mesh, bias_by_layer: Optional[Iterable] = None) -> dict:
        """Reduce over ranks (collective: every rank calls it with the same keys) and return a flat JSON-ready
        dict."""
        if mesh.pp_size > 1:  # the stages hold different layers and losses: reduce the union of their keys
            _align_keys(self.sums, mesh, 0.0)
            _align_keys(self.maxes, mesh, float("-inf"))
        reduced = _reduce_over_ranks(self.sums, mesh, "sum")
        record: dict = {}
        # each value is counted by the ranks of one stage (the world without pipelining): dp_size of them
        world, micro = mesh.dp_size, max(1, self.num_micro)
        for k, v in reduced.items():
            how = reduction(k)
            if k.endswith("/tokens_per_expert"):  # rank_mean, then the load ratios of the step's counts
                counts = v / world
                record[k] = [round(float(c), 3) for c in counts]
                prefix = k[: -len("tokens_per_expert")]
                record.update({prefix + name: x for name, x in load_balance(counts).items()})
            elif k.endswith(("/_tokens_per_device", "/_tokens_received_per_device")):
                ratio = imbalance(v)
                if k.endswith("/_tokens_per_device"):
                    record[k[: -len("_tokens_per_device")] + "device_load_imbalance"] = ratio
                    agg = "moe/device_load_imbalance"
                else:
                    agg = "moe/comm_imbalance"
                record[agg] = max(record.get(agg, ratio), ratio)
            elif k.startswith("moe/_"):
                continue
            elif how == "sum":
                record[k] = float(v.item())
            elif how == "layer_mean":
                record[k] = float(v.item() / reduced["moe/_layer_samples"].item())
            elif how == "mean":
                record[k] = float(v.item() / (micro * world))
            else:
                raise AssertionError(f"{k}: no rule for reduction {how!r}")
        maxes = _reduce_over_ranks(self.maxes, mesh, "max")
        record.update({k: float(v.item()) for k, v in maxes.items()})
        biases = {}
        for layer_id, bias_E in bias_by_layer or ():
            b = bias_E.detach().float().cpu()
            biases[f"moe/layer{layer_id}/bias_min"] = float(b.min())
            biases[f"moe/layer{layer_id}/bias_max"] = float(b.max())
            biases[f"moe/layer{layer_id}/bias_absmean"] = float(b.abs().mean())
        if mesh.pp_size > 1:  # every stage's biases (equal on the ranks of a stage)
            for part in parallel.gather_objects(biases, mesh):
                record.update(part)
        else:
            record.update(biases)
        return record
