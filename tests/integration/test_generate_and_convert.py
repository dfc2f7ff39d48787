"""The inference and interop commands end to end, driven through their command lines on tiny trained runs:
`python -m train.generate`, `scripts/convert_hf.py export|import` (checked against transformers), and
`trainer.init_from` on an imported checkpoint (architecture and tokenizer from the checkpoint)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration._runs import FAST_DATA, REPO, env_for, run_cli, step_records, train_cli, train_here

pytestmark = pytest.mark.slow

SMALL = [*FAST_DATA, "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
         "trainer.eval_every=0", "logging.wandb=disabled", "logging.progress=false"]
EXPORTABLE = ("tiny_mixtral", "tiny_deepseek_v3", "tiny_dbrx", "tiny_deepseek_v2")


@pytest.fixture(scope="module")
def cache_dir(cache):
    return cache  # the session's (conftest.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """model name -> run dir of a few training steps (each model trained once per module). Trained in this process
    by the trainer `python -m train` runs (the command line itself is test_train_cli's): what these tests drive
    through their command lines is what reads the checkpoints, and four interpreter starts are saved."""
    runs = {}

    def get(model: str) -> Path:
        if model not in runs:
            run_dir = tmp_path_factory.mktemp(model) / "run"
            train_here([f"model={model}", "trainer.max_steps=3", f"trainer.run_dir={run_dir}",
                        f"data.cache_dir={cache_dir}", *SMALL], cache_dir)
            runs[model] = run_dir
        return runs[model]

    return get


def generate(cache_dir: Path, *args: str) -> dict:
    proc = run_cli([sys.executable, "-m", "train.generate", *args], cache_dir)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generate_here(capsys, *args: str) -> dict:
    """`train.generate`'s main in this process: what the command line prints, without another interpreter start."""
    from train.generate import main

    capsys.readouterr()
    main(list(args))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def failing(cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env_for(cache_dir), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    return proc


def ours(ckpt):
    """(model in eval mode, tokenizer) of a checkpoint, as generate loads them."""
    from train.generate import load_for_inference

    model, tokenizer = load_for_inference(str(ckpt))
    return model.eval(), tokenizer


def test_generate_greedy_matches_plain_forward_and_sampling_runs(trained, cache_dir, capsys):
    """One greedy and one sampled generation through the command line; their repeats (and the other sampling) call
    its main in this process: a determinism check across two processes, and one that also fails where sampling
    draws from the global RNG instead of its seeded generator."""
    run_dir = trained("tiny_mixtral")
    args = [f"checkpoint={run_dir}", "prompt=def ", "max_new_tokens=8"]
    first, second = generate(cache_dir, *args), generate_here(capsys, *args)
    assert first == second  # greedy is deterministic
    assert set(first) >= {"prompt_ids", "output_ids", "text"}

    model, tokenizer = ours(run_dir)
    assert first["prompt_ids"] == tokenizer.encode("def ", add_special_tokens=False)
    ids = list(first["prompt_ids"])
    expected = []
    with torch.no_grad():  # no KV cache: the whole sequence every step
        for _ in range(8):
            next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(next_id)
            ids.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    assert first["output_ids"] == expected
    assert len(expected) == 8 or expected[-1] == tokenizer.eos_token_id
    assert first["text"] == tokenizer.decode(expected, skip_special_tokens=True)

    sample_args = [*args, "temperature=0.8", "top_p=0.9", "seed=3"]
    sampled = [generate(cache_dir, *sample_args), generate_here(capsys, *sample_args)]
    assert sampled[0] == sampled[1]  # seeded
    assert 1 <= len(sampled[0]["output_ids"]) <= 8
    assert generate_here(capsys, *args, "temperature=1.0", "seed=5")["prompt_ids"] == first["prompt_ids"]


@pytest.mark.parametrize("model_name", EXPORTABLE)
def test_export_loads_in_transformers_with_equal_logits(model_name, trained, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = trained(model_name)
    out = tmp_path / "hf"
    # V3 is exported in 1 MB shards (as a large model would be, past 5 GB): transformers must read the index
    shards = ["--max-shard-size", "1MB"] if model_name == "tiny_deepseek_v3" else []
    run_cli([sys.executable, "scripts/convert_hf.py", "export", str(run_dir), str(out), *shards], cache_dir)
    if shards:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(files) > 2 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
        assert not (out / "model.safetensors").exists() and all(f.stat().st_size <= 2_000_000 for f in files)
    else:
        assert (out / "model.safetensors").is_file()

    model, tokenizer = ours(run_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = "def main(argv):\n    return sorted(set(argv))  # ünïcode\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids)
    with torch.no_grad():
        input_ids = torch.tensor([ids])
        torch.testing.assert_close(hf_model(input_ids).logits, model(input_ids).logits, atol=1e-4, rtol=0)


def test_import_then_init_from_takes_architecture_and_tokenizer(trained, cache_dir, tmp_path):
    """An imported Mixtral checkpoint started with `model=tiny_dbrx`: the run is a Mixtral with the
    checkpoint's weights and tokenizer, so its first-step loss is the original weights' loss on that batch."""
    from train.checkpoint import load_config, load_model
    from train.data import build_data
    from train.model import build_model

    src = trained("tiny_mixtral")
    hf_dir, ck, run_dir = tmp_path / "hf", tmp_path / "ck", tmp_path / "ft"
    run_cli([sys.executable, "scripts/convert_hf.py", "export", str(src), str(hf_dir)], cache_dir)
    run_cli([sys.executable, "scripts/convert_hf.py", "import", str(hf_dir), str(ck)], cache_dir)
    _, src_state, src_tok = load_model(src)
    _, ck_state, _ = load_model(ck)
    assert ck_state.keys() == src_state.keys()
    assert all(torch.equal(ck_state[k], src_state[k]) for k in src_state)  # the round trip is exact

    proc = train_cli(["model=tiny_dbrx", f"trainer.init_from={ck}", "trainer.max_steps=2",
                      f"trainer.run_dir={run_dir}", f"data.cache_dir={cache_dir}",
                      "model.moe.expert_balance_coef=0.01", *SMALL], cache_dir)
    assert "architecture from" in proc.stdout + proc.stderr
    cfg = load_config(run_dir / "checkpoints" / "step_00000002")
    src_cfg = load_config(next((src / "checkpoints").iterdir()))
    assert cfg.model.family == "mixtral" and cfg.model.norm == "rmsnorm" and cfg.model.attention.clip_qkv is None
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.moe.num_experts) == \
        (src_cfg.model.d_model, src_cfg.model.num_layers, src_cfg.model.moe.num_experts)
    assert cfg.model.moe.expert_balance_coef == 0.01  # a training knob set on the command line is kept
    assert cfg.data.tokenizer == str(ck / "tokenizer")
    assert (run_dir / "checkpoints" / "step_00000002" / "tokenizer" / "tokenizer.json").read_text() == \
        (src_tok / "tokenizer.json").read_text()

    # The first step's loss is computed before any update: the original weights on the run's first batch.
    data = build_data(cfg)
    batch = data.next_global_batch_for_rank()[0]
    model = build_model(cfg.model)
    model.load_state_dict(src_state)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["labels"])
    first = step_records(run_dir)[0]
    assert first["step"] == 1
    assert first["lm_loss"] == pytest.approx(float(out.lm_loss), rel=1e-5)
    assert first["loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_init_from_rejects_a_contradicting_architecture_override(trained, cache_dir, tmp_path):
    src = trained("tiny_mixtral")
    proc = failing(cache_dir, "-m", "train", f"trainer.init_from={src}", "model.d_model=64",
                   f"trainer.run_dir={tmp_path / 'r'}", f"data.cache_dir={cache_dir}", *SMALL)
    assert "model.d_model=64 contradicts trainer.init_from" in proc.stderr + proc.stdout
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_error_paths(tmp_path, cache_dir):
    proc = failing(cache_dir, "-m", "train.generate", f"checkpoint={tmp_path / 'nope'}", "prompt=x")
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr

    incomplete = tmp_path / "run" / "checkpoints" / "step_00000001"
    incomplete.mkdir(parents=True)
    (incomplete / "model.safetensors").write_bytes(b"")  # an interrupted save: no COMPLETE marker
    proc = failing(cache_dir, "-m", "train.generate", f"checkpoint={tmp_path / 'run'}", "prompt=x")
    assert "no complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr

    # DeepSeekMoE has no native transformers class: export refuses it by name.
    from train.checkpoint import mark_complete, save_model
    from train.config import load_train_config
    from train.model import build_model

    cfg = load_train_config(["model=tiny_deepseek_moe", "model.num_layers=2", "model.vocab_size=512"])
    ckpt = tmp_path / "dsmoe" / "checkpoints" / "step_00000001"
    save_model(ckpt, cfg, build_model(cfg.model).state_dict())
    mark_complete(ckpt)
    proc = failing(cache_dir, "scripts/convert_hf.py", "export", str(tmp_path / "dsmoe"), str(tmp_path / "hf"))
    assert "DeepSeekMoE" in proc.stderr and "Traceback" not in proc.stderr
