"""`python -m train.generate checkpoint=PATH prompt="..." max_new_tokens=N [temperature=T top_p=P seed=S]`

Greedy by default (temperature=0). PATH is a run dir (its newest complete checkpoint) or one checkpoint. Uses the
model's KV cache, so each new token costs one position of compute. The last line printed is JSON with
`prompt_ids`, `output_ids` (the new tokens only) and `text` (the decoded new tokens).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch
from omegaconf import OmegaConf


@dataclass
class GenerateConfig:
    checkpoint: str = "???"
    prompt: str = ""
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    device: str = "cpu"
    stop_at_eos: bool = True


def sample_next(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature == 0; otherwise nucleus sampling over the smallest set with mass >= top_p."""
    if temperature <= 0.0:
        return int(torch.argmax(logits_V))
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_ids = torch.sort(probs_V, descending=True)
        # keep a token if the mass before it is still below top_p (so the first token is always kept)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.no_grad()
def generate_ids(model, prompt_ids: List[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_id: Optional[int] = None) -> List[int]:
    """New token ids after `prompt_ids`, decoding with the model's KV cache."""
    from train.model import new_kv_caches

    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    caches = new_kv_caches(model)
    ids_BT = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    positions_T = torch.arange(len(prompt_ids), device=device)
    out: List[int] = []
    for _ in range(max_new_tokens):
        logits_BTV = model(ids_BT, positions=positions_T, kv_caches=caches).logits
        next_id = sample_next(logits_BTV[0, -1].cpu(), temperature, top_p, generator)
        out.append(next_id)
        if eos_id is not None and next_id == eos_id:
            break
        pos = int(positions_T[-1]) + 1
        ids_BT = torch.tensor([[next_id]], dtype=torch.long, device=device)
        positions_T = torch.tensor([pos], device=device)
    return out


def load_for_inference(checkpoint: str, device: str = "cpu"):
    """(model, tokenizer) from a run dir or checkpoint dir: the build pipeline (`train.build`) up to its load
    step, on an inference copy of the run's config (one process, fp32, no training transforms)."""
    from transformers import AutoTokenizer

    from train import checkpoint as ckpt_io
    from train.build import build_model, for_inference

    ckpt = ckpt_io.resolve_checkpoint(checkpoint)
    tok_dir = ckpt / ckpt_io.TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no tokenizer/ directory; cannot encode the prompt")
    ckpt_io.verify_checkpoint(ckpt, only=ckpt_io.weight_files(ckpt))
    cfg, mesh = for_inference(ckpt_io.load_config(ckpt), device)
    # init_seed 0 sets the RoPE tables and buffers; every weight is overwritten by the load step
    built = build_model(cfg, mesh, init_seed=0, stop_after="load",
                        weights=lambda model: _stream_weights(model, ckpt, cfg.model))
    from train.hf.folders import refuse_remote_code

    refuse_remote_code(tok_dir, "tokenizer", error=ckpt_io.CheckpointError)
    return built.model, AutoTokenizer.from_pretrained(str(tok_dir))


def _stream_weights(model, ckpt, model_cfg) -> None:
    """Copy every logical tensor of `ckpt` into `model` in place, one tensor read at a time."""
    from train import checkpoint as ckpt_io

    targets = model.state_dict()
    loaded = set()
    for name, tensor in ckpt_io.iter_weights(ckpt):
        if name not in targets:
            raise ckpt_io.CheckpointError(f"{ckpt} holds {name}, which model config {model_cfg.name!r} does not "
                                          f"build: check {ckpt}/config.yaml")
        targets[name].copy_(tensor)
        loaded.add(name)
    tied = {"lm_head.weight"} if model_cfg.tie_embeddings else set()
    missing = sorted(set(targets) - loaded - tied)
    if missing:
        raise ckpt_io.CheckpointError(f"{ckpt} lacks weights the model needs: {missing[:6]}")


def main(argv: List[str]) -> None:
    gcfg: GenerateConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(GenerateConfig), OmegaConf.from_dotlist(argv)))
    for arg in argv:  # the prompt verbatim: the dotlist grammar strips surrounding spaces and parses ${...}
        if arg.startswith("prompt="):
            gcfg.prompt = arg[len("prompt="):]
    from train.checkpoint import CheckpointError

    try:
        model, tokenizer = load_for_inference(gcfg.checkpoint, gcfg.device)
    except (CheckpointError, FileNotFoundError) as e:  # a user error: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    prompt_ids = tokenizer.encode(gcfg.prompt, add_special_tokens=False)
    if not prompt_ids:  # an empty prompt starts from the document separator
        prompt_ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    output_ids = generate_ids(model, prompt_ids, gcfg.max_new_tokens, gcfg.temperature, gcfg.top_p, gcfg.seed,
                              tokenizer.eos_token_id if gcfg.stop_at_eos else None)
    text = tokenizer.decode(output_ids, skip_special_tokens=True)
    print(gcfg.prompt + text)
    print(json.dumps({"prompt_ids": prompt_ids, "output_ids": output_ids, "text": text}))


if __name__ == "__main__":
    from train.quick_exit import skip_final_collection

    skip_final_collection()
    main(sys.argv[1:])
