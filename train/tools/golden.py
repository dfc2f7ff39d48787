"""Write the golden loss curves `tests/golden/<model>_fp32.json` that `tests/integration/test_golden.py` checks.

    python scripts/make_golden.py                      # every model in MODELS
    python scripts/make_golden.py tiny_mixtral         # one

Run it ONLY when a change is meant to alter the computation (a new init, a loss term, a data order, a fixed
bug), and say so in the change: the curves exist so that a refactor which should not change the numbers is
caught when it does. Never regenerate them to make a failing golden test pass without knowing why it failed.

The run is small and deterministic: a synthetic corpus generated here (so it does not depend on the Python
version, unlike the embedded stdlib corpus), a 512-token builtin BPE, sequences of 32 tokens, global batch 8 in
two micro-batches (accumulation is exercised), 8 steps, one CPU thread, fp32, driven in-process through
`train.trainer.loop.Trainer`. Bitwise equality across different CPUs is not guaranteed (BLAS kernels pick
different blockings and vector widths per CPU), so the test compares with an absolute tolerance of 1e-5.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO / "tests" / "golden"
MODELS = ("tiny_mixtral", "tiny_deepseek_v3")
KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss")
OVERRIDES = [
    "precision=fp32", "data.tokenizer_vocab_size=512", "model.vocab_size=512", "data.val_fraction=0.05",
    "trainer.seq_len=32", "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=8",
    "trainer.seed=1234", "trainer.eval_every=0", "trainer.save_every=1000", "trainer.resume=never",
    "trainer.device=cpu", "trainer.compile=false", "optim.warmup_steps=2", "logging.progress=false",
    "logging.wandb=disabled",
]
_WORDS = ("the a one every some expert token router layer model batch step gradient loss weight device "
          "sends routes mixes learns drops keeps balances scales shares splits quickly slowly again never "
          "often small large sparse dense early late first last").split()


def golden_corpus(num_docs: int = 400) -> list[str]:
    """Deterministic documents from a fixed linear congruential generator (no library RNG whose algorithm could
    change between versions): sentences over a small vocabulary with a repeated structure a model can learn."""
    x, docs = 12345, []

    def draw(n: int) -> int:
        nonlocal x
        x = (1103515245 * x + 12345) % 2**31
        return (x >> 8) % n

    for _ in range(num_docs):
        sentences = []
        for _ in range(3 + draw(5)):
            words = [_WORDS[draw(len(_WORDS))] for _ in range(4 + draw(8))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def run_golden(model: str, workdir: Path) -> list[dict]:
    """Train `model` with OVERRIDES on the golden corpus in `workdir`; the per-step values of KEYS."""
    import torch

    from parallel import Mesh
    from train.config import load_train_config
    from train.trainer.loop import Trainer
    from train.trainer.validate import validate_config

    workdir = Path(workdir)
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in golden_corpus()))
    cfg = load_train_config([f"model={model}", *OVERRIDES, "data=files", f"data.paths=[{corpus}]",
                             f"data.cache_dir={workdir / 'cache'}", f"trainer.run_dir={workdir / model}"])
    validate_config(cfg, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order
    try:
        trainer = Trainer(cfg, Mesh())
        trainer.fit()
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (workdir / model / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{k: r[k] for k in KEYS if k in r}} for r in records if "loss" in r]


def main(argv: list[str] | None = None) -> None:
    """Regenerate the curves of the models named in `argv` (the command line's; all of MODELS when none)."""
    import torch

    models = (sys.argv[1:] if argv is None else argv) or list(MODELS)

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            steps = run_golden(model, Path(tmp))
        out = GOLDEN_DIR / f"{model}_fp32.json"
        meta = {"model": model, "overrides": OVERRIDES, "made_with": {
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}}
        out.write_text(json.dumps({**meta, "steps": steps}, indent=1) + "\n")
        print(f"wrote {out} ({len(steps)} steps, final loss {steps[-1]['loss']:.6f})")

