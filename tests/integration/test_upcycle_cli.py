"""`scripts/upcycle.py` end to end through the command lines: a tiny transformers Llama folder (with a tokenizer)
is upcycled granularly; the checkpoint trains with `trainer.init_from`, `train.generate` reads it, and
`convert_hf.py export` writes a Mixtral folder whose logits equal both ours and the dense Llama's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.integration._runs import REPO, env_for, run_cli, step_records, train_cli

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

VOCAB = 320


def test_upcycle_train_generate_export(tmp_path, cache):
    from tests.unit.test_hf_parity import _tokenizer_dir
    from tests.unit.test_upcycle import hf_folder, our_logits

    dense = hf_folder(tmp_path / "llama", "llama")
    transformers.AutoTokenizer.from_pretrained(str(_tokenizer_dir(tmp_path))).save_pretrained(str(tmp_path / "llama"))
    moe = tmp_path / "moe"
    run_cli([sys.executable, "scripts/upcycle.py", str(tmp_path / "llama"), str(moe), "model.moe.num_experts=4",
             "model.moe.top_k=2", "model.moe.granularity=2"], cache)
    assert (moe / "COMPLETE").is_file() and (moe / "tokenizer" / "tokenizer.json").is_file()

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=ids, use_cache=False).logits
    ours, _ = our_logits(moe, ids)
    assert (ours - ref).abs().max().item() <= 1e-5

    run_cli([sys.executable, "scripts/convert_hf.py", "export", str(moe), str(tmp_path / "hf")], cache)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager",
                                                           experts_implementation="eager", dtype=torch.float32)
    assert hf.config.model_type == "mixtral" and hf.config.num_local_experts == 8
    with torch.no_grad():
        exported = hf.eval()(input_ids=ids, use_cache=False).logits
    assert (exported - ref).abs().max().item() <= 1e-5

    proc = run_cli([sys.executable, "-m", "train.generate", f"checkpoint={moe}", "prompt=def ",
                    "max_new_tokens=4"], cache)
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["output_ids"]) == 4

    run_dir = tmp_path / "run"
    train_cli([f"trainer.init_from={moe}", f"trainer.run_dir={run_dir}", f"data.cache_dir={cache}",
               "data.max_corpus_mb=1", "trainer.seq_len=32", "trainer.global_batch_size=4",
               "trainer.micro_batch_size=4", "trainer.max_steps=4", "trainer.eval_every=0",
               "logging.wandb=disabled", "logging.progress=false"], cache)
    losses = [r["loss"] for r in step_records(run_dir)]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_bad_source_is_a_clear_error_on_the_command_line(tmp_path, cache):
    transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4).save_pretrained(str(tmp_path / "gpt2"))
    proc = subprocess.run([sys.executable, "scripts/upcycle.py", str(tmp_path / "gpt2"), str(tmp_path / "out")],
                          cwd=REPO, env=env_for(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "error: " in proc.stderr and "cannot upcycle HF model_type 'gpt2'" in proc.stderr
    assert "Traceback" not in proc.stderr
