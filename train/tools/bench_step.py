"""Whole training steps: moeforge's trainer against a plain loop over transformers' `MixtralForCausalLM`, on the
same config, initial weights, batches, optimizer and autocast dtype. Tokens/s and MFU of both.

    python scripts/bench_step.py [--steps 8] [--warmup 2] [--batch 4] [--seq 128] [--hf-experts IMPL] [overrides]

Options come first; everything after them is a Hydra override of `python -m train` (default `model=tiny_mixtral`,
`precision=fp32`; e.g. `precision=bf16 model.d_model=1024`). `--batch` sequences of `--seq` tokens per step, in
micro-batches of `trainer.micro_batch_size` (default: the whole batch in one).

Ours is what `python -m train` runs: `train.trainer.loop.Trainer` built from the config (data, model,
parallelize, engine, precision, schedule) and trained by its own `fit()` for warmup + steps steps, with
`trainer.peak_flops=measure`; its tokens/s and MFU are the ones it writes to metrics.jsonl.
The Hugging Face side starts from the trainer's initial weights: saved as a step-0 checkpoint and exported by
`convert_hf.py export`'s own function (`export_checkpoint`, i.e. the family exporter's `hf_config` and `to_hf`),
loaded with `MixtralForCausalLM.from_pretrained` (transformers' default attention and experts implementations
unless `--hf-experts` names one). Its plain loop takes the trainer's batches (`global_batch_for_rank(step)`, the
same token ids), the same AdamW parameter groups (`param_groups`), learning-rate schedule and gradient clipping,
the same autocast, and the objective a transformers user trains: mean token cross-entropy plus transformers'
router balance loss (`output_router_logits`) with the exporter's `router_aux_loss_coef`. transformers pools every
layer's router logits into one balance term where moeforge sums a term per layer, so the total losses differ by
that (cheap) term; the cross-entropy is what must agree.

Tokens/s is the median over the steps after the warm-up ones, timed the way the trainer times a step (data
already in memory for the HF loop; the trainer's own batch fetch is in its time). MFU divides the model FLOPs
(`train.flops.flops_per_token`, the same for both: it is the same model) by the measured peak of the device in
the run's compute dtype. The first step's cross-entropies must agree (same weights, same batch): their difference
is printed (and `first_step_agrees` in the JSON), and proves the comparison is like for like. The last line is
JSON with `ours_tokens_per_s`, `hf_tokens_per_s`, `mfu` (ours), `hf_mfu`, `peak_flops`, `speedup` and more.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path


import torch

# The first step's cross-entropy of the two sides must agree this closely (same weights, same batch): fp32 differs
# only by summation order; autocast rounds matmul inputs to bf16, in a different order on each side.
LM_LOSS_TOL = {"fp32": 1e-3, "bf16": 5e-2, "bf16_autocast": 5e-2, "fp8": 5e-2}
DEFAULTS = ["model=tiny_mixtral", "trainer.eval_every=0", "trainer.resume=never", "logging.progress=false",
            "logging.wandb=disabled", "trainer.save_every=1000000"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps after the warm-up ones")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernel selection)")
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--hf-experts", default=None, help="transformers' experts_implementation (eager, grouped_mm, "
                                                      "batched_mm); default: transformers' own default")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. precision=bf16 model.d_model=1024")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 1:
        p.error("--steps, --batch and --seq must be >= 1 and --warmup >= 0")
    return args


def compose(args, run_dir: Path):
    """The typed, validated config: defaults, the user's overrides, then the sizes the options fix."""
    from train.config import load_train_config
    from train.trainer.validate import validate_config

    user_micro = [o for o in args.overrides if o.startswith("trainer.micro_batch_size=")]
    cfg = load_train_config([*DEFAULTS, "trainer.peak_flops=measure", *args.overrides,
                             f"trainer.max_steps={args.warmup + args.steps}", f"trainer.seq_len={args.seq}",
                             f"trainer.global_batch_size={args.batch}",
                             *([] if user_micro else [f"trainer.micro_batch_size={args.batch}"]),
                             f"trainer.run_dir={run_dir}"])
    validate_config(cfg, world_size=1)
    return cfg


def check_mixtral(model_cfg) -> None:
    """Stop with a clear message unless transformers' MixtralForCausalLM can express the model."""
    from train.hf import mixtral
    from train.hf.errors import HFConversionError
    from train.hf.convert import flatten_granularity

    if model_cfg.family != "mixtral":
        sys.exit(f"bench_step.py: model {model_cfg.name} is of family {model_cfg.family!r}, which "
                 f"MixtralForCausalLM cannot express: use a Mixtral-family config (model=tiny_mixtral, ...)")
    try:
        mixtral.check_exportable(flatten_granularity(model_cfg))
    except HFConversionError as e:
        sys.exit(f"bench_step.py: {e}")


def export_initial_weights(trainer, out: Path, experts_implementation=None):
    """The trainer's step-0 weights as a transformers model, through the checkpoint and the HF export path."""
    import transformers

    from train.hf import export_checkpoint

    ckpt = trainer.save()
    export_checkpoint(ckpt, out)
    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return transformers.MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw)


def hf_loop(model, cfg, batches, device) -> list[dict]:
    """A plain training loop over the HF model: one record (loss, seconds) per optimizer step."""
    import torch.nn.functional as F

    from train.precision import build_precision
    from train.trainer.optim import optimizer_factory, param_groups
    from train.trainer.schedule import LRSchedule

    model.to(device).train()
    optimizer = optimizer_factory(cfg.optim)(param_groups(model, cfg.optim.weight_decay))
    schedule = LRSchedule(cfg.optim, cfg.trainer.max_steps)
    precision = build_precision(cfg.precision, device)
    # a plain loop's way to compute in bf16 is autocast, also for precision=bf16 (moeforge: bf16 weight copies)
    dtype = precision.compute_dtype
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    coef = model.config.router_aux_loss_coef
    records = []
    for step, micro_batches in enumerate(batches):
        start = time.perf_counter()
        schedule.apply(optimizer, step)
        sums = torch.zeros(2, device=device)  # lm loss, loss
        for mb in micro_batches:
            ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
            with autocast:
                out = model(input_ids=ids, output_router_logits=True, use_cache=False)
            lm = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            loss = lm + coef * out.aux_loss
            (loss / len(micro_batches)).backward()
            sums += torch.stack([lm.detach(), loss.detach()]) / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_loss, loss = sums.tolist()  # reads the values back: the device is synchronised
        records.append({"lm_loss": lm_loss, "loss": loss, "seconds": time.perf_counter() - start})
    return records


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import parallel
    from train.trainer.loop import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        tmp = Path(tmp)
        cfg = compose(args, tmp / "run")
        check_mixtral(cfg.model)
        mesh = parallel.init_distributed(cfg)
        if mesh.world_size > 1:
            sys.exit("bench_step.py compares one process with one HF loop: run it with python, not torchrun")
        trainer = Trainer(cfg, mesh)
        hf_model = export_initial_weights(trainer, tmp / "hf", args.hf_experts)
        batches = [trainer.data.global_batch_for_rank(s) for s in range(cfg.trainer.max_steps)]
        trainer.fit()
        trainer.close()
        ours = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        flops_per_token, peak, peak_source = trainer.flops_per_token, trainer.peak_flops, trainer.peak_flops_source
        del trainer
        hf = hf_loop(hf_model, cfg, batches, mesh.device)

    tokens_per_step = cfg.trainer.global_batch_size * cfg.trainer.seq_len
    timed = slice(args.warmup, None)
    ours_tps = statistics.median(r["tokens_per_s"] for r in ours[timed])
    hf_tps = statistics.median(tokens_per_step / r["seconds"] for r in hf[timed])
    lm_diff = abs(ours[0]["lm_loss"] - hf[0]["lm_loss"])
    mfu = lambda tps: flops_per_token * tps / peak  # noqa: E731
    hf_cfg, m = hf_model.config, cfg.model
    result = {
        "model": cfg.model.name, "precision": cfg.precision.name, "device": str(mesh.device),
        "d_model": m.d_model, "num_layers": m.num_layers, "num_experts": m.moe.num_experts, "top_k": m.moe.top_k,
        "expert_hidden": m.moe.expert_hidden,
        "tokens_per_step": tokens_per_step, "steps": args.steps, "warmup": args.warmup,
        "ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps, "speedup": ours_tps / hf_tps,
        "mfu": mfu(ours_tps), "hf_mfu": mfu(hf_tps), "peak_flops": peak, "peak_flops_source": peak_source,
        "flops_per_token": flops_per_token,
        "first_lm_loss_ours": ours[0]["lm_loss"], "first_lm_loss_hf": hf[0]["lm_loss"],
        "first_lm_loss_diff": lm_diff, "first_step_agrees": lm_diff <= LM_LOSS_TOL[cfg.precision.name],
        "first_loss_ours": ours[0]["loss"], "first_loss_hf": hf[0]["loss"],
        "hf_attn_implementation": hf_cfg._attn_implementation,
        "hf_experts_implementation": getattr(hf_cfg, "_experts_implementation", None),
        "torch_threads": torch.get_num_threads(),
    }
    print_summary(result)
    print(json.dumps(result))
    return result


def print_summary(r: dict) -> None:
    print(f"\n{r['model']} (d_model {r['d_model']}, {r['num_layers']} layers, {r['num_experts']} experts of width "
          f"{r['expert_hidden']}, top {r['top_k']}) {r['precision']} on {r['device']} ({r['torch_threads']} threads), "
          f"{r['tokens_per_step']} tokens per step, median of {r['steps']} steps after {r['warmup']} warm-up; MFU against "
          f"{r['peak_flops']:.3g} FLOP/s ({r['peak_flops_source']}), {r['flops_per_token']:.3g} FLOPs per token")
    print(f"  moeforge trainer      {r['ours_tokens_per_s']:>12,.0f} tokens/s   MFU {r['mfu']:7.2%}")
    print(f"  transformers loop     {r['hf_tokens_per_s']:>12,.0f} tokens/s   MFU {r['hf_mfu']:7.2%}   "
          f"(attention {r['hf_attn_implementation']}, experts {r['hf_experts_implementation']})")
    print(f"  speedup {r['speedup']:.2f}x")
    print(f"  first step, same weights and batch: cross-entropy ours {r['first_lm_loss_ours']:.6f}, HF "
          f"{r['first_lm_loss_hf']:.6f}, |diff| {r['first_lm_loss_diff']:.2e} "
          f"({'agrees' if r['first_step_agrees'] else 'DOES NOT AGREE: the comparison is not like for like'}); "
          f"with the balance loss ours {r['first_loss_ours']:.6f}, HF {r['first_loss_hf']:.6f}")

