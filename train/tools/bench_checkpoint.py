"""Sharded checkpoint save and load: time and bytes per rank, with real AdamW state.

    torchrun --standalone --nproc_per_node=4 scripts/bench_checkpoint.py model=tiny_deepseek_v3 parallel.ep_size=4
    torchrun --standalone --nproc_per_node=4 scripts/bench_checkpoint.py --adam-state model=tiny_mixtral \\
        model.d_model=1024 model.num_layers=4 model.moe.num_experts=28 model.moe.expert_hidden=2816 \\
        model.vocab_size=32000 parallel.ep_size=4                                   # ~1.05B parameters

Builds the model the trainer's way (meta device, `parallelize`), gives it optimizer state (one AdamW step on random
tokens, or with `--adam-state` random moments of the real shapes, for models whose gradients would not fit
next to them on this machine), then times the trainer's save path (`collect_owned` + DCP save: every rank writes
its share) and load path (the trainer's resume order: a fresh model, its weights read in place, the engine, then the
optimizer state in batches through it; `load_s` counts the reads, not the engine's construction), and checks that
what was loaded equals what was saved. Last line: JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch



def _rss() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fingerprint(t: torch.Tensor) -> tuple:
    """Order-sensitive summary of a tensor (equal tensors, equal fingerprints; a moved or changed element shows)."""
    flat, total, weighted = t.detach().reshape(-1), 0.0, 0.0
    for start in range(0, flat.numel(), 1 << 20):  # in chunks: a float64 copy of a whole expert stack is GBs
        chunk = flat[start:start + (1 << 20)].double()
        total += float(chunk.sum())
        weighted += float((chunk * torch.arange(start + 1, start + chunk.numel() + 1, dtype=torch.float64)).sum())
    return total, weighted


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adam-state", action="store_true", help="random AdamW moments instead of one real step")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    ap.add_argument("--load-batch-mb", type=int, default=256, help="optimizer state restored per batch")
    args, overrides = ap.parse_known_args(argv)

    import parallel
    from train.checkpoint import sharded
    from train.config import load_train_config
    from train.build import EngineArgs, build_model, meta_model
    from train.model.transformer import draw_init_seed, tensor_seed

    cfg = load_train_config(["trainer.device=cpu", *overrides])
    mesh = parallel.init_distributed(cfg)
    torch.manual_seed(0)
    total_params = sum(p.numel() for p in meta_model(cfg.model).parameters())
    # the load step (after materialisation, before the engine) only reads the resident memory
    built = build_model(cfg, mesh, init_seed=draw_init_seed(), weights=lambda m: _rss(), engine_args=EngineArgs(1))
    model, engine, rss_model = built.model, built.engine, built.loaded
    if args.adam_state:  # random moments of the real shapes (a step's gradients would not fit beside them here)
        offsets = {n: s.local_start for n, s in sharded.expert_slices(model).items()}
        for n, p in model.named_parameters():  # one parameter at a time: no second copy of the state
            # the same values on every rank holding this tensor (replicas agree, as after a real step)
            g = torch.Generator().manual_seed(tensor_seed(0, n, offsets.get(n)))
            engine.import_state({n: {"step": torch.tensor(1.0), "exp_avg": torch.randn(p.shape, generator=g),
                                     "exp_avg_sq": torch.rand(p.shape, generator=g)}})
    else:
        ids = torch.randint(0, cfg.model.vocab_size, (1, 65), generator=torch.Generator().manual_seed(mesh.rank))
        engine.backward(engine.forward(ids[:, :-1], ids[:, 1:]).loss)
        engine.step()

    rss = {"after_model": rss_model, "after_state": _rss()}
    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    ckpt = root / f"bench_checkpoint_{parallel.broadcast_object(time.time_ns(), mesh)}"
    parallel.barrier(mesh)
    t0 = time.perf_counter()
    sharded.save(sharded.collect_owned(model, engine.export_state(), mesh), ckpt, mesh)
    parallel.barrier(mesh)
    save_s = time.perf_counter() - t0
    rss["after_save"] = _rss()

    saved = {n: {k: fingerprint(v) for k, v in st.items()} for n, st in engine.export_state()}  # not copies
    saved_buffers = {n: fingerprint(b) for n, b in sharded.persistent_buffers(model).items()}
    del engine, model
    gc.collect()

    # the trainer's resume order: a fresh model (another init seed), its weights, the engine, the optimizer state
    sharded._LOAD_BATCH_BYTES = args.load_batch_mb << 20

    def load_timed(model) -> float:
        parallel.barrier(mesh)
        t0 = time.perf_counter()
        sharded.load_model_weights(model, ckpt, mesh)
        parallel.barrier(mesh)
        return time.perf_counter() - t0

    built = build_model(cfg, mesh, init_seed=1, weights=load_timed, engine_args=EngineArgs(1))
    model, engine, weights_s = built.model, built.engine, built.loaded
    parallel.barrier(mesh)
    t0 = time.perf_counter()
    for batch in sharded.read_optimizer_state(model, ckpt, mesh):
        engine.import_state(batch)
    parallel.barrier(mesh)
    load_s = weights_s + time.perf_counter() - t0
    rss["after_load"] = _rss()
    wrong = [f"{n}:{k}" for n, st in engine.export_state() for k, v in st.items() if fingerprint(v) != saved[n][k]]
    wrong += [n for n, b in sharded.persistent_buffers(model).items() if fingerprint(b) != saved_buffers[n]]
    restored = not wrong
    if wrong:
        print(f"rank {mesh.rank}: not restored: {wrong[:6]}", file=sys.stderr)

    files = sorted((ckpt / sharded.STATE_DIR).iterdir())
    my_file = [f for f in files if f.name.startswith(f"__{mesh.rank}_")]
    per_rank = parallel.gather_objects(sum(f.stat().st_size for f in my_file), mesh)
    ok = parallel.gather_objects(restored, mesh)
    if mesh.rank == 0:
        result = {"model": cfg.model.name, "total_params": total_params, "world_size": mesh.world_size,
                  "ep_size": mesh.ep_size, "zero_stage": cfg.parallel.zero_stage, "save_s": round(save_s, 3),
                  "load_s": round(load_s, 3), "bytes_total": sum(f.stat().st_size for f in files),
                  "bytes_per_rank": per_rank, "index_bytes": (ckpt / sharded.STATE_DIR / ".metadata").stat().st_size,
                  "restored_exactly": all(ok), "rank0_rss_bytes": rss, "checkpoint": str(ckpt)}
        print(f"save {save_s:.2f} s, load {load_s:.2f} s, {result['bytes_total'] / 1e9:.3f} GB in {len(files)} files; "
              f"restored exactly: {all(ok)}")
        print(json.dumps(result))
    parallel.barrier(mesh)
    if mesh.rank == 0 and not args.dir:
        import shutil

        shutil.rmtree(ckpt)
    parallel.shutdown(mesh)

