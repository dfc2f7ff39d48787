"""Sharded checkpoints in logical coordinates, written and read with `torch.distributed.checkpoint` (DCP).

    CKPT/state/.metadata         the index: every logical key, its shape and dtype, and which file holds it
    CKPT/state/__{r}_0.distcp    what rank r wrote (one file per rank)

Keys name logical tensors of the unsharded model, never "rank 3's slice", so any layout can read any other's:
    model/{name}                       a dense parameter or persistent buffer, whole
    model/{name}/expert/{e}            expert e (global index) of a stacked expert tensor
    optim/{name}/{kind}                optimizer state `kind` (exp_avg, exp_avg_sq, momentum_buffer, step, ...)
    optim/{name}/expert/{e}/{kind}     the same for expert e; state that is not shaped like the parameter (the
                                       step count) is stored once per stacked tensor as optim/{name}/{kind}
Tied weights are stored under their first name (`embed.weight`) only.

Each logical key is written by exactly one rank (`Writers`): dense keys round-robin over the world, expert e by
one of the ranks that hold it (its owner in the layer's `ExpertPlacement`, replica e mod W/ep), so the save runs on
every rank in parallel, nothing is gathered to one rank, no tensor is stored twice and no rank's file holds experts
it does not own.
Loading is by key: a rank asks for its dense tensors and its own experts, whatever layout wrote them (DCP finds
the file), which is how a checkpoint reshards across world size, `ep_size` and ZeRO stage.

Why not DTensor: the experts' placement ([Replicate, Shard(0)] over an (edp, ep) mesh) would say the same, but
per-expert keys keep the format independent of any mesh, readable in one process without one, and name exactly
what the issue of "logical coordinates" asks for: expert e of layer l.

`.metadata` is a pickle in DCP's format; `SafeReader` unpickles it with an allow-list of DCP's metadata classes
(plain `pickle.load` would run whatever a planted file asks), and DCP reads tensors with `weights_only=True`.
"""
from __future__ import annotations

import math

import contextlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from train.model.moe.experts import stacked_expert_tensors
from train.model.moe.placement import ExpertPlacement

STATE_DIR = "state"
_LOAD_BATCH_BYTES = 1 << 30  # optimizer state is restored in batches of about this many bytes (host memory bound)


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint that cannot be read into this model, with what to do about it."""


# ---------------------------------------------------------------------------------------------------- keys
def model_key(name: str, expert: Optional[int] = None) -> str:
    return f"model/{name}" if expert is None else f"model/{name}/expert/{expert}"


def optim_key(name: str, kind: str, expert: Optional[int] = None) -> str:
    return f"optim/{name}/{kind}" if expert is None else f"optim/{name}/expert/{expert}/{kind}"


def expert_slices(model: nn.Module) -> dict[str, ExpertPlacement]:
    """state-dict name → its experts' placement (this rank holds `local_range` of `num_global_experts`) for every
    stacked expert tensor of the model."""
    return {name: experts.placement for name, experts in stacked_expert_tensors(model).items()}


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of `model` by state-dict name (e.g. the expert selection bias)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n: b for n, b in model.state_dict(keep_vars=True).items() if n not in params}


class Writers:
    """Which rank writes each logical key. Dense names are numbered in sorted order (the same on every rank) and
    spread round-robin; expert e lives at EP position `placement.owner(e)` of every EP group, and replica
    e mod (W/ep) writes it."""

    def __init__(self, dense_names: Iterable[str], world_size: int, ep_size: int):
        self.world, self.ep = world_size, ep_size
        self.dense_rank = {n: i % world_size for i, n in enumerate(sorted(dense_names))}

    def dense(self, name: str) -> int:
        return self.dense_rank[name]

    def expert(self, e: int, placement: ExpertPlacement) -> int:
        if placement.ep_size != self.ep:
            raise ValueError(f"experts placed over {placement.ep_size} EP ranks, the writers over {self.ep}")
        position = placement.owner(e)
        replica = e % (self.world // self.ep)
        return replica * self.ep + position


def _pieces(t: torch.Tensor, placement: Optional[ExpertPlacement],
            param_shape) -> Iterator[tuple[Optional[int], torch.Tensor]]:
    """(global expert or None, tensor) for one local tensor of a parameter: split per expert when it is a stacked
    expert tensor shaped like its parameter, whole otherwise (a scalar such as the step)."""
    if placement is not None and tuple(t.shape) == tuple(param_shape):
        for i, e in enumerate(placement.local_range):
            yield e, t[i]
    else:
        yield None, t


# ---------------------------------------------------------------------------------------------------- save
def collect_owned(model: nn.Module, exported: Iterator[tuple[str, dict]], mesh) -> dict[str, torch.Tensor]:
    """This rank's share of the logical state: the keys `Writers` assigns to it, as CPU tensors.

    `exported` is the engine's `export_state()`: for every parameter (same order on every rank; collective
    under ZeRO) a dict kind → this rank's whole local tensor, with kind "param" for the weights. Tensors this
    rank does not write are dropped as soon as they are seen, so the host holds only its share; CPU tensors are
    kept as views (no copy), so save before the next optimizer step changes them."""
    slices = expert_slices(model)
    buffers = persistent_buffers(model)
    params = dict(model.named_parameters())
    copies = pipeline_copies(model, mesh)
    # within a pipeline stage (the world without pipelining): the stage's ranks share its keys
    writers = Writers([n for n in params if n not in slices and n not in copies] + list(buffers), mesh.dp_size,
                      mesh.ep_size)
    owned: dict[str, torch.Tensor] = {}

    def writer(name: str, expert: Optional[int]) -> int:
        if name in copies:  # the first stage writes the embedding; the last stage's twin is not written
            return -1
        if name in slices:  # state kept once per stacked tensor (the step) goes with expert 0
            return writers.expert(0 if expert is None else expert, slices[name])
        return writers.dense(name)

    for name, states in exported:
        shape = tuple(getattr(params[name], "ds_shape", params[name].shape))  # ZeRO-3: the unpartitioned shape
        for kind, t in states.items():
            for expert, piece in _pieces(t, slices.get(name), shape):
                if writer(name, expert) == mesh.dp_rank:  # a view: DCP copies one tensor at a time as it writes
                    key = model_key(name, expert) if kind == "param" else optim_key(name, kind, expert)
                    owned[key] = piece.detach().cpu()
    for name, b in buffers.items():
        if writers.dense(name) == mesh.dp_rank:
            owned[model_key(name)] = b.detach().cpu()
    return owned


def save(owned: dict[str, torch.Tensor], ckpt_dir: Path, mesh) -> None:
    """Collective: every rank writes its `owned` tensors into `ckpt_dir/state/` in parallel; rank 0 (DCP's
    coordinator) writes the index."""
    with _single_process_quiet():
        dcp.save(owned, storage_writer=dcp.FileSystemWriter(str(Path(ckpt_dir) / STATE_DIR)),
                 no_dist=not _distributed(mesh))


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process call that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---------------------------------------------------------------------------------------------------- read
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
     ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("torch.distributed.checkpoint.filesystem", "SerializationFormat")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and name in _TORCH_SCALARS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


_TORCH_SCALARS = {n for n in dir(torch) if isinstance(getattr(torch, n, None), (torch.dtype, torch.layout,
                                                                                  torch.memory_format))}


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the index unpickled through an allow-list, read once and cached (a streaming
    reader calls `dcp.load` once per tensor)."""

    def __init__(self, path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            path = Path(self.path) / ".metadata"
            try:
                with open(path, "rb") as f:
                    self._metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError) as e:
                raise ShardedCheckpointError(f"{path} is unreadable or was altered ({e}); the checkpoint is damaged: "
                                             f"resume from an earlier one with trainer.resume=<path>") from None
            self._metadata.storage_meta = getattr(self._metadata, "storage_meta", None)
            check_storage_names(self._metadata, path)
        return self._metadata


def check_storage_names(metadata, where: Path) -> None:
    """Every file a DCP index points to is a plain file name in its own directory (`__{rank}_{i}.distcp`), so
    nothing outside the checkpoint can be read through a planted `../` or absolute path."""
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise ShardedCheckpointError(f"{where} points to {name!r}, not a file of its own directory: refused "
                                         f"(altered; nothing outside the checkpoint is read)")


def check_file_sizes(ckpt_dir: Path) -> None:
    """Each `.distcp` file the index names exists and is as long as the index says: the check a checkpoint without
    `CHECKSUMS.json` can still get (a truncated or missing rank file), from the index alone."""
    state = Path(ckpt_dir) / STATE_DIR
    need: dict[str, int] = {}
    for info in SafeReader(state).read_metadata().storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, end in sorted(need.items()):
        path = state / name
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < end:
            raise ShardedCheckpointError(f"{path}: {'missing' if size is None else f'{size} bytes'}, its index "
                                         f"needs {end} (truncated); the checkpoint is damaged")


def has_state(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / STATE_DIR / ".metadata").is_file()


def index(ckpt_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor key of a sharded checkpoint → (shape, dtype), from its index alone."""
    md = SafeReader(Path(ckpt_dir) / STATE_DIR).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def _load(targets: dict[str, torch.Tensor], reader: SafeReader, distributed: bool) -> None:
    if targets or distributed:
        with _single_process_quiet():
            dcp.load(targets, storage_reader=reader, no_dist=not distributed)


def pipeline_copies(model: nn.Module, mesh) -> frozenset[str]:
    """Names this rank holds as a pipeline's second copy (`parallel.pipeline`: the last stage's embedding), which
    the first stage writes."""
    from train.model.stage import EMBEDDING

    if mesh is None or mesh.pp_size == 1 or mesh.pp_rank == 0:
        return frozenset()
    return frozenset({EMBEDDING}) & frozenset(dict(model.named_parameters()))


def _distributed(mesh) -> bool:
    return mesh is not None and mesh.world_size > 1 and dist.is_available() and dist.is_initialized()


@torch.no_grad()
def load_model_weights(model: nn.Module, ckpt_dir: Path, mesh) -> None:
    """Collective: every rank reads its dense tensors and its own experts into `model` in place. Before: the
    model is parallelized (materialised); after: it holds the checkpoint's weights, whatever layout saved them."""
    idx = index(ckpt_dir)
    slices = expert_slices(model)
    targets, expected = {}, {}
    for name, t in {**dict(model.named_parameters()), **persistent_buffers(model)}.items():
        if name in slices:
            placement = slices[name]
            total = placement.num_global_experts
            for i, e in enumerate(placement.local_range):
                targets[model_key(name, e)] = t.data[i]
            expected[model_key(name, 0)] = tuple(t.shape[1:])
            if model_key(name, total - 1) not in idx or model_key(name, total) in idx:
                have = sum(1 for k in idx if k.startswith(model_key(name) + "/expert/"))
                legacy = model_key(name.rsplit(".", 1)[0] + ".w_gate_EDF", 0)
                if have == 0 and legacy in idx:
                    raise ShardedCheckpointError(
                        f"{ckpt_dir} stores experts in the per-projection layout (w_gate_EDF, w_up_EDF, w_down_EFD) "
                        "of moeforge before the fused w_gate_up_EHD / w_down_EDF layout; this version cannot read "
                        "it: resume it with the moeforge commit that wrote it, or export it to Hugging Face there "
                        "and import the export here (scripts/convert_hf.py)")
                raise ShardedCheckpointError(f"{name}: the checkpoint {ckpt_dir} has {have} experts, the model "
                                             f"{total}: check model.moe.num_experts / granularity against its config.yaml")
        else:
            targets[model_key(name)] = t.data
            expected[model_key(name)] = tuple(t.shape)
    missing = sorted(k for k in expected if k not in idx)
    wrong = [f"{k[6:]}: checkpoint {idx[k][0]}, model {s}" for k, s in expected.items() if k in idx and idx[k][0] != s]
    extra = sorted(k[6:] for k in idx if k.startswith("model/") and "/expert/" not in k and k not in expected)
    if mesh is not None and mesh.pp_size > 1:  # a pipeline stage holds some of the keys; the others, the rest
        extra = []
    if missing or wrong or extra:
        raise ShardedCheckpointError(
            f"the weights in {ckpt_dir} do not fit this model: "
            + "; ".join(filter(None, [f"missing {[k[6:] for k in missing[:6]]}" if missing else "",
                                      f"unexpected {extra[:6]}" if extra else "", ", ".join(wrong[:6])]))
            + f". Check {ckpt_dir}/config.yaml against the model.* overrides")
    _load(targets, SafeReader(Path(ckpt_dir) / STATE_DIR), _distributed(mesh))


def optimizer_kinds(idx: dict, name: str) -> list[str]:
    """The optimizer state kinds stored for parameter `name` (empty: saved before any step)."""
    kinds = set()
    for k in idx:
        if k.startswith(f"optim/{name}/"):
            kinds.add(k.rsplit("/", 1)[1])
    return sorted(kinds)


@torch.no_grad()
def read_optimizer_state(model: nn.Module, ckpt_dir: Path, mesh) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Collective: yields batches {param name: {kind: this rank's whole local tensor (CPU)}} covering every
    parameter in `model.named_parameters()` order, each batch about `_LOAD_BATCH_BYTES` (so host memory holds
    one batch, not the whole state). Every rank yields the same number of batches."""
    idx = index(ckpt_dir)
    reader = SafeReader(Path(ckpt_dir) / STATE_DIR)
    slices = expert_slices(model)
    batch: dict[str, dict[str, torch.Tensor]] = {}
    targets: dict[str, torch.Tensor] = {}
    size = 0
    names = list(dict(model.named_parameters()).items())
    if _distributed(mesh) and mesh.pp_size > 1:
        # the stages hold different parameters, so they would load in different numbers of batches; DCP's load
        # is collective over the world: every rank loads as often as the rank with the most batches
        rounds = _pipeline_rounds(names, idx, slices, mesh)
    else:
        rounds = None
    loads = 0
    for i, (name, p) in enumerate(names):
        local_shape = tuple(p.shape) if name not in slices else (slices[name].num_local_experts, *p.shape[1:])
        if hasattr(p, "ds_shape"):  # ZeRO-3 partitioned: the local (unpartitioned) shape
            local_shape = tuple(p.ds_shape)
        states = {}
        for kind in optimizer_kinds(idx, name):
            if name in slices and optim_key(name, kind) not in idx:  # shaped like the parameter: per expert
                local = slices[name].local_range
                t = torch.empty(local_shape, dtype=idx[optim_key(name, kind, local[0])][1])
                for j, e in enumerate(local):
                    targets[optim_key(name, kind, e)] = t[j]
            else:
                shape, dtype = idx[optim_key(name, kind)]
                t = torch.empty(shape, dtype=dtype)
                targets[optim_key(name, kind)] = t
            states[kind] = t
            size += t.numel() * t.element_size()
        batch[name] = states
        if size >= _LOAD_BATCH_BYTES or i == len(names) - 1:
            _load(targets, reader, _distributed(mesh))
            loads += 1
            yield batch
            batch, targets, size = {}, {}, 0
    for _ in range(loads, rounds or 0):
        _load({}, reader, True)


def _batch_count(names, idx, slices) -> int:
    """How many batches `read_optimizer_state` loads these parameters in (its own batching, sizes only)."""
    count, size = 0, 0
    for i, (name, p) in enumerate(names):
        for kind in optimizer_kinds(idx, name):
            if name in slices and optim_key(name, kind) not in idx:
                shape, dtype = idx[optim_key(name, kind, slices[name].local_range[0])]
                n = slices[name].num_local_experts * math.prod(shape)
            else:
                shape, dtype = idx[optim_key(name, kind)]
                n = math.prod(shape)
            size += n * dtype.itemsize
        if size >= _LOAD_BATCH_BYTES or i == len(names) - 1:
            count, size = count + 1, 0
    return count


def _pipeline_rounds(names, idx, slices, mesh) -> int:
    """The most batches any rank loads (collective)."""
    n = torch.tensor([_batch_count(names, idx, slices)], dtype=torch.int64)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def iter_logical_weights(ckpt_dir: Path, names: Optional[Iterable[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, logical tensor) of every weight in a sharded checkpoint, one tensor at a time (a stacked expert
    tensor is assembled from its experts), in one process. `names` restricts and orders them."""
    idx = index(ckpt_dir)
    reader = SafeReader(Path(ckpt_dir) / STATE_DIR)
    experts: dict[str, int] = {}
    dense = []
    for k in idx:
        if not k.startswith("model/"):
            continue
        if "/expert/" in k:
            base, e = k[6:].rsplit("/expert/", 1)
            experts[base] = max(experts.get(base, 0), int(e) + 1)
        else:
            dense.append(k[6:])
    for name in (list(names) if names is not None else [*dense, *experts]):
        if name in experts:
            shape, dtype = idx[model_key(name, 0)]
            t = torch.empty((experts[name], *shape), dtype=dtype)
            _load({model_key(name, e): t[e] for e in range(experts[name])}, reader, False)
        elif model_key(name) in idx:
            shape, dtype = idx[model_key(name)]
            t = torch.empty(shape, dtype=dtype)
            _load({model_key(name): t}, reader, False)
        else:
            raise ShardedCheckpointError(f"{ckpt_dir} has no weight named {name}")
        yield name, t


def logical_weight_names(ckpt_dir: Path) -> list[str]:
    """The weight names of a sharded checkpoint (stacked expert tensors once), in index order."""
    seen = {}
    for k in index(ckpt_dir):
        if k.startswith("model/"):
            seen.setdefault(k[6:].split("/expert/", 1)[0], None)
    return list(seen)
