"""Saving and resuming `TrainState` in the layout of `layout.py` (docs/ARCHITECTURE.md).

    RUN_DIR/checkpoints/step_00000100/
      state/                                       weights and optimizer state, sharded in logical coordinates:
                                                   each rank writes its share in parallel, an index ties them
                                                   (sharded.py, torch.distributed.checkpoint)
      config.yaml, tokenizer/                      rank 0
      train_state.pt                               step, tokens, data position, scheduler, wandb id, layout
      train_state_rank{r}.pt                       rank r's RNG states
      CHECKSUMS.json                               every file's SHA-256, each hashed by the rank that wrote it
      COMPLETE                                     written last

A save writes into `checkpoints/.tmp_step_*`, the checksums and COMPLETE last, then renames it into place; it
never overwrites an existing directory (a leftover temporary directory is moved aside, not removed), and deletes
older complete checkpoints only with `trainer.keep_last=N`, once the new one is complete. A write that fails on any
rank fails the save on every rank (`SaveError`, save_errors.py): its temporary directory is removed, nothing older
is touched, and the trainer continues or stops as `trainer.on_save_error` says.

`trainer.resume=auto` takes the newest complete checkpoint whose files match their checksums: a damaged newer one
(truncated, a flipped byte, a missing rank file) is reported and skipped, never deleted.

Every file is read without unpickling arbitrary objects (DCP's index through an allow-list, tensors and the
trainer's files with `weights_only=True`, or safetensors).

Resuming on any world size, `ep_size` and ZeRO stage restores the weights, the optimizer state and the data
position exactly: every rank reads the logical tensors it holds in the new layout. The RNG states are per rank and
are restored when the world size is unchanged (they drive only noisy routers and jitter).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

import parallel
from train.checkpoint import layout as ckpt_io
from train.checkpoint import sharded
from train.checkpoint.checksums import CHECKSUM_FILE, checksum_entries, write_checksums
from train.checkpoint.save_errors import SaveAttempt, SaveError
from train.config import TrainConfig
from train.trainer.state import TrainState

log = logging.getLogger("train")

COMMON_FILE = "train_state.pt"


def rank_file(rank: int) -> str:
    return f"train_state_rank{rank}.pt"


def layout_of(mesh, cfg: TrainConfig) -> dict:
    """What the per-rank files depend on: the rank grid and how ZeRO partitions the optimizer state."""
    return {"world_size": mesh.world_size, "ep_size": mesh.ep_size, "zero_stage": cfg.parallel.zero_stage,
            **({"pp_size": mesh.pp_size} if mesh.pp_size > 1 else {})}


def save_checkpoint(state: TrainState, cfg: TrainConfig, mesh, run_dir: Path,
                    tokenizer_dir: Optional[Path]) -> Optional[Path]:
    """Collective: every rank calls it. Returns the checkpoint dir (None when that step is already saved).

    A write that fails on any rank (a full disk, a file-size limit, an I/O error) raises `SaveError` on every
    rank, with one line naming the file and the reason: the temporary directory is removed (freeing what it
    held), no older checkpoint is touched, and no directory that looks complete is left (COMPLETE is written
    inside the temporary directory, which is then renamed into place in one step)."""
    root = Path(run_dir) / "checkpoints"
    final = root / ckpt_io.step_dir_name(state.step)
    tmp = root / f".tmp_{final.name}"
    if parallel.broadcast_object(ckpt_io.is_complete(final) if mesh.rank == 0 else None, mesh):
        if mesh.rank == 0:
            log.warning("checkpoint %s already exists; not overwriting it", final)
        return None
    attempt = SaveAttempt(mesh)
    if mesh.rank == 0:
        attempt.write(root, _make_tmp, root, tmp, final)
        attempt.write(tmp / ckpt_io.CONFIG_FILE, ckpt_io.save_config, tmp, cfg)
        attempt.write(tmp / ckpt_io.TOKENIZER_DIR, ckpt_io.copy_tokenizer, tmp, tokenizer_dir)
        attempt.write(tmp / COMMON_FILE, torch.save, state.common_state_dict(layout_of(mesh, cfg)), tmp / COMMON_FILE)
    hashed = {}
    if attempt.agree() is None:
        owned = sharded.collect_owned(state.model, state.engine.export_state(), mesh)  # collective under ZeRO
        attempt.write(tmp / sharded.STATE_DIR, sharded.save, owned, tmp, mesh)  # collective; fails on every rank
        del owned
        attempt.write(tmp / rank_file(mesh.rank), torch.save, state.rank_state_dict(), tmp / rank_file(mesh.rank))
        hashed = attempt.write(tmp, _hash_own_files, tmp, mesh.rank) or {}  # each rank hashes its files
    attempt.agree()
    hashed = parallel.gather_objects(hashed, mesh)
    if mesh.rank == 0 and attempt.error is None:
        known = {k: v for part in hashed for k, v in part.items()}
        attempt.write(tmp / CHECKSUM_FILE, write_checksums, tmp, skip=(ckpt_io.COMPLETE_MARKER,), known=known)
        attempt.write(tmp / ckpt_io.COMPLETE_MARKER, ckpt_io.write_marker, tmp)
        attempt.write(final, tmp.rename, final)  # one step: a step_* directory is complete or absent
    outcome = None
    if mesh.rank == 0:
        if attempt.error is None:
            if cfg.trainer.keep_last is not None:
                prune_checkpoints(root, cfg.trainer.keep_last)
        else:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save on a full disk: free what it took
            outcome = (attempt.error, ckpt_io.newest_complete(root))
    outcome = parallel.broadcast_object(outcome, mesh)
    if outcome is not None:
        message, previous = outcome
        raise SaveError(f"checkpoint {final.name} not saved: {message}; "
                        + (f"the newest complete checkpoint is {previous}" if previous else "there is no earlier "
                           "complete checkpoint"), previous)
    return final


def _make_tmp(root: Path, tmp: Path, final: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for leftover in (tmp, final):  # an interrupted save: kept for inspection, moved out of the way
        if leftover.exists():
            leftover.rename(root / f".stale_{leftover.name.lstrip('.')}_{time.time_ns()}")
    tmp.mkdir()


def _hash_own_files(tmp: Path, rank: int) -> dict:
    mine = [rank_file(rank)] + [f"{sharded.STATE_DIR}/{p.name}" for p in (tmp / sharded.STATE_DIR).iterdir()
                                if p.name.startswith(f"__{rank}_")]
    return checksum_entries(tmp, mine)


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints under `root` (called right after a save is
    complete, so the newest is always a finished one); interrupted saves and `.stale_*` leftovers are not
    touched. Returns the deleted directories."""
    doomed = [path for _, path in ckpt_io.list_complete(root)[:-keep_last]]
    for path in doomed:
        try:
            shutil.rmtree(path)
        except OSError as e:  # an I/O error while deleting costs disk space, not the save that just succeeded
            log.warning("could not delete checkpoint %s (trainer.keep_last=%d): %s", path, keep_last, e)
            continue
        log.info("deleted checkpoint %s (trainer.keep_last=%d)", path, keep_last)
    return doomed


def _verified(ckpt_dir: Path) -> Path:
    """`ckpt_dir` if it can be resumed from and every file matches its checksum, else `CheckpointError`."""
    check_resumable(ckpt_dir)
    ckpt_io.verify_checkpoint(ckpt_dir)
    return ckpt_dir


def _newest_intact(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of run_dir whose files are intact; each damaged newer one is reported and
    skipped (never deleted). None when there is none at all; `CheckpointError` when every one is damaged."""
    found = ckpt_io.list_complete(run_dir)
    problems = []
    for _, ckpt_dir in reversed(found):
        try:
            chosen = _verified(ckpt_dir)
        except ckpt_io.CheckpointError as e:
            log.warning("%s; trying the previous checkpoint", e)
            problems.append(str(e))
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint (%d newer one(s) damaged, kept as they are)",
                        chosen, len(problems))
        return chosen
    if problems:
        raise ckpt_io.CheckpointError(f"every complete checkpoint in {run_dir} is damaged (newest: {problems[0]}): "
                                      f"nothing was deleted; inspect them or start a new trainer.run_dir")
    return None


def find_resume_checkpoint(cfg: TrainConfig, run_dir: Path, mesh) -> Optional[Path]:
    """The checkpoint `trainer.resume` asks for, verified against its checksums: with `auto` the newest intact
    complete one in run_dir (a damaged newer one is reported and skipped), none with `never`, else the given
    path (which must be intact). Rank 0 reads and hashes; every rank returns its answer (collective)."""
    resume = cfg.trainer.resume
    if resume == "never":
        return None
    answer = None
    if mesh.rank == 0:
        try:
            answer = ("ok", _newest_intact(Path(run_dir)) if resume == "auto"
                      else _verified(ckpt_io.resolve_checkpoint(resume)))
        except ckpt_io.CheckpointError as e:
            answer = ("error", str(e))
    status, value = parallel.broadcast_object(answer, mesh)
    if status == "error":
        raise ckpt_io.CheckpointError(value)
    return value


def load_weights(model: torch.nn.Module, path, mesh, model_cfg=None, verify: bool = True) -> Path:
    """Load only the model weights of a checkpoint (resume, trainer.init_from); returns the resolved checkpoint
    dir. Collective. A sharded checkpoint is read in place, each rank its own tensors (any layout saved it); a
    `model.safetensors` one (imported) is read whole and sliced. With `model_cfg`, the weights are first checked
    against the logical shapes that config builds (a clear error naming each mismatching tensor), and expert
    selection biases the checkpoint lacks start at zero (a zero bias routes exactly as no bias; see
    train/trainer/init_from.py). `verify=False` skips the checksums of the weight files, for a checkpoint
    `find_resume_checkpoint` has just verified whole."""
    ckpt_dir = ckpt_io.resolve_checkpoint(path)
    if sharded.has_state(ckpt_dir):
        if verify and mesh.rank == 0:
            ckpt_io.verify_checkpoint(ckpt_dir, only=ckpt_io.weight_files(ckpt_dir))
        parallel.barrier(mesh)
        try:
            sharded.load_model_weights(model, ckpt_dir, mesh)
        except sharded.ShardedCheckpointError as e:
            raise ckpt_io.CheckpointError(str(e)) from None
        return ckpt_dir
    _, state_dict, _ = ckpt_io.load_model(ckpt_dir, verify=verify)
    if model_cfg is not None:
        state_dict = _fit_to_config(state_dict, model_cfg, ckpt_dir)
    parallel.load_full_state_dict(model, state_dict, mesh)
    return ckpt_dir


def _fit_to_config(state_dict: dict, model_cfg, ckpt_dir: Path) -> dict:
    from train.build import meta_model

    expected = meta_model(model_cfg).state_dict()
    state_dict = dict(state_dict)
    for name, t in expected.items():
        if name not in state_dict and name.endswith("expert_bias_E"):
            state_dict[name] = torch.zeros(t.shape, dtype=t.dtype)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    bad = [f"{k}: the config builds {tuple(expected[k].shape)}, the checkpoint has {tuple(state_dict[k].shape)}"
           for k in sorted(set(expected) & set(state_dict)) if expected[k].shape != state_dict[k].shape]
    if missing or extra or bad:
        raise ckpt_io.CheckpointError(
            f"the weights in {ckpt_dir} do not fit model config {model_cfg.name!r} (family {model_cfg.family}): "
            + "; ".join(filter(None, [f"missing {missing[:6]}" if missing else "",
                                      f"unexpected {extra[:6]}" if extra else "", ", ".join(bad[:6])]))
            + f". Check {ckpt_dir}/config.yaml against the weights and any model.* overrides")
    return state_dict


def check_resumable(ckpt_dir: Path) -> None:
    """A checkpoint to resume from must carry the trainer's state, not only weights."""
    if not (ckpt_dir / COMMON_FILE).is_file():
        raise ckpt_io.CheckpointError(
            f"{ckpt_dir} has no {COMMON_FILE} (an imported checkpoint?): start from it with trainer.init_from")


def resume_from(state: TrainState, ckpt_dir: Path, cfg: TrainConfig, mesh) -> None:
    """Restore counters, data position, RNG (same world size) and the engine's optimizer state, resharded into
    this run's layout. The weights were loaded before the engine was built (`load_weights`), because ZeRO
    copies them at build time. Collective."""
    check_resumable(ckpt_dir)
    common = ckpt_io.load_torch_file(ckpt_dir / COMMON_FILE)
    state.load_common_state_dict(common)
    saved = common.get("layout") or {}
    if saved.get("world_size") == mesh.world_size:
        rank_path = ckpt_dir / rank_file(mesh.rank)
        if not rank_path.is_file():  # marked COMPLETE yet a rank's file is gone: damaged
            raise ckpt_io.CheckpointError(
                f"{rank_path} is missing from {ckpt_dir}, saved with this run's world size; the checkpoint is "
                f"damaged: resume from an earlier one with trainer.resume=<path to checkpoints/step_*>")
        state.load_rank_state_dict(ckpt_io.load_torch_file(rank_path))
    if not sharded.has_state(ckpt_dir):
        if mesh.rank == 0:
            log.warning("%s holds no sharded optimizer state (an older checkpoint format): weights and data "
                        "position restored, optimizer state starts fresh", ckpt_dir)
        return
    for batch in sharded.read_optimizer_state(state.model, ckpt_dir, mesh):
        state.engine.import_state(batch)
    if mesh.rank == 0 and saved and saved != layout_of(mesh, cfg):
        log.info("resharded checkpoint %s from layout %s to %s (weights and optimizer state)", ckpt_dir, saved,
                 layout_of(mesh, cfg))
