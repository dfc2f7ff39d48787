"""Benchmark the loss head: the plain one (whole logits, `F.cross_entropy`) against the chunked one
(`train/model/loss_head.py`), forward + backward of the summed CE of N tokens over V classes from D-wide hidden
states, in fp32 and under bf16 autocast.

    python scripts/bench_loss_head.py [--tokens 8192] [--vocab 32000] [--d-model 1024] [--chunk 1024]
                                      [--dtypes fp32,bf16] [--repeats 2] [--warmup 1] [--threads N] [--device cpu]

Per dtype and head: `saved_bytes` (what autograd keeps from forward to backward, the weight excluded: saved-tensor
hooks), `peak_bytes` (the most that forward + backward hold at once beyond the inputs: CUDA's allocator peak, or on
CPU the new storages alive op by op, `train.plan.measure.peak_new_bytes`, in an untimed pass), `ms` (mean of
--repeats timed passes after --warmup) and the largest difference of the loss and gradients from the plain head.
One line per dtype with the ratios; the last line is JSON with every figure.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from train.model.loss_head import IGNORE_INDEX, chunked_cross_entropy
from train.plan.measure import peak_new_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk (model.loss_chunk_tokens)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _step(h_ND, w_VD, labels_N, chunk: int, autocast: bool):
    """One forward + backward of the summed CE; (loss, grad h, grad W). chunk 0: the plain head."""
    h_ND.grad = w_VD.grad = None
    with torch.autocast(h_ND.device.type, dtype=torch.bfloat16, enabled=autocast):
        if chunk:
            loss = chunked_cross_entropy(h_ND, w_VD, labels_N, chunk)
        else:
            loss = F.cross_entropy(F.linear(h_ND, w_VD).float(), labels_N, ignore_index=IGNORE_INDEX,
                                   reduction="sum")
    loss.backward()
    return loss.detach(), h_ND.grad, w_VD.grad


def _saved_bytes(h_ND, w_VD, labels_N, chunk: int, autocast: bool) -> int:
    seen = {}

    def pack(t):
        if t is not w_VD:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(h_ND, w_VD, labels_N, chunk, autocast)
    return sum(seen.values())


def _peak_bytes(h_ND, w_VD, labels_N, chunk: int, autocast: bool) -> int:
    if h_ND.device.type != "cuda":
        return peak_new_bytes(lambda: _step(h_ND, w_VD, labels_N, chunk, autocast))[1]
    h_ND.grad = w_VD.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(h_ND, w_VD, labels_N, chunk, autocast)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _ms(h_ND, w_VD, labels_N, chunk: int, autocast: bool, warmup: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if h_ND.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        _step(h_ND, w_VD, labels_N, chunk, autocast)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        _step(h_ND, w_VD, labels_N, chunk, autocast)
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def bench(args) -> dict:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n, v, d = args.tokens, args.vocab, args.d_model
    h_ND = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w_VD = (torch.randn(v, d, generator=g) / d**0.5).to(device).requires_grad_()
    labels_N = torch.randint(0, v, (n,), generator=g)
    labels_N[::16] = IGNORE_INDEX  # some ignored positions, as padding or document ends give
    labels_N = labels_N.to(device)
    rows = []
    for name in args.dtypes.split(","):
        autocast = {"fp32": False, "bf16": True}[name]
        row = {"dtype": name}
        results = {}
        for head, chunk in (("plain", 0), ("chunked", args.chunk)):
            results[head] = [t.clone() for t in _step(h_ND, w_VD, labels_N, chunk, autocast)]
            row[f"{head}_saved_bytes"] = _saved_bytes(h_ND, w_VD, labels_N, chunk, autocast)
            row[f"{head}_peak_bytes"] = _peak_bytes(h_ND, w_VD, labels_N, chunk, autocast)
            row[f"{head}_ms"] = _ms(h_ND, w_VD, labels_N, chunk, autocast, args.warmup, args.repeats)
        for i, what in enumerate(("loss", "grad_h", "grad_w")):
            ref = results["plain"][i]
            row[f"max_rel_diff_{what}"] = ((results["chunked"][i] - ref).abs().max() / ref.abs().max()).item()
        rows.append(row)
        print(f"{name}: saved {row['plain_saved_bytes'] / 2**20:.1f} -> {row['chunked_saved_bytes'] / 2**20:.1f} MiB "
              f"({row['plain_saved_bytes'] / row['chunked_saved_bytes']:.1f}x less), peak "
              f"{row['plain_peak_bytes'] / 2**20:.1f} -> {row['chunked_peak_bytes'] / 2**20:.1f} MiB "
              f"({row['plain_peak_bytes'] / row['chunked_peak_bytes']:.1f}x less), time {row['plain_ms']:.0f} -> "
              f"{row['chunked_ms']:.0f} ms ({row['chunked_ms'] / row['plain_ms']:.2f}x)", flush=True)
    return {"tokens": n, "vocab": v, "d_model": d, "chunk": args.chunk, "device": str(device),
            "threads": torch.get_num_threads(), "results": rows}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(args)
    print(json.dumps(result))
    return result
