"""Spawn N gloo ranks on CPU for a test. The target must be a module-level function `fn(rank, world_size,
*args)`; an exception in any rank fails the test (with that rank's traceback)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.ports import free_port


def _worker(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    # the torchrun environment, so `init_distributed` takes its real multi-process path
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Ranks fork from a server process that has imported torch, the model, dynamo and DeepSpeed once (`_preload.py`),
# instead of each spawned interpreter paying the multi-second imports again; the server never runs OpenMP work,
# so forking is safe.
_PRELOAD = ["torch", "torch.distributed", "train.config", "train.model", "parallel", "tests.distributed._preload"]


def run_distributed(fn, world_size: int, *args) -> None:
    """Run `fn` on `world_size` fresh gloo ranks on a free port; re-raises the first failure. A port that another
    process took between `free_port` and rank 0's bind (nothing of the test has run yet) is retried on a new one."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    for attempt in range(3):
        try:
            mp.start_processes(_worker, args=(fn, world_size, free_port(), args), nprocs=world_size,
                               join=True, start_method="forkserver")
            return
        except mp.ProcessRaisedException as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
