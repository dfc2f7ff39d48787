"""Hostile checkpoint and model folders: each is refused with one line, and nothing outside the directory is read.

Every test plants a file outside the checkpoint and records every file opened (`builtins.open` and `io.open`, which
`Path.read_bytes`/`read_text` use) and every `os.stat`/`lstat` of the planted path, so a check that read the planted
file first and refused afterwards would fail. Checkpoints are built by hand (one tensor through DCP, a
train_state.pt, CHECKSUMS.json and COMPLETE), so no model is trained here."""
from __future__ import annotations

import builtins
import dataclasses
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from parallel import Mesh
from train.checkpoint import CheckpointError, mark_complete, resolve_checkpoint, verify_checkpoint
from train.checkpoint import sharded
from train.checkpoint.checksums import CHECKSUM_FILE, write_checksums
from train.checkpoint.save_resume import _newest_intact
from train.config.errors import ConfigError
from train.hf.convert import check_hf_config
from train.hf.errors import HFConversionError


def make_ckpt(run_dir: Path, step: int) -> Path:
    d = run_dir / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    sharded.save({"model/w": torch.arange(4096, dtype=torch.float32) * step}, d, Mesh())
    torch.save({"step": step}, d / "train_state.pt")
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "tokenizer_config.json").write_text("{}")
    mark_complete(d)
    return d


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "outside" / "secret.distcp"
    secret.parent.mkdir()
    secret.write_bytes(b"\0" * 64)
    return secret


@pytest.fixture
def reads(monkeypatch, outside):
    """Every path opened while the test runs; fails the test at once if the planted file is opened."""
    opened = []

    def spy(real):
        def wrapped(file, *a, **k):
            if isinstance(file, (str, Path)):
                opened.append(Path(file))
                assert Path(file).resolve() != outside.resolve(), f"read {file} outside the checkpoint"
            return real(file, *a, **k)
        return wrapped

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    return opened


def test_checksums_naming_a_path_outside_are_refused(tmp_path, outside, reads):
    ckpt = make_ckpt(tmp_path / "run", 1)
    for planted in ("../../../outside/secret.distcp", str(outside)):
        entries = json.loads((ckpt / CHECKSUM_FILE).read_text())
        entries[planted] = {"bytes": 64, "sha256": "0" * 64}
        (ckpt / CHECKSUM_FILE).write_text(json.dumps(entries))
        with pytest.raises(CheckpointError, match="a path outside the checkpoint") as e:
            verify_checkpoint(ckpt, only=["train_state.pt"])
        assert "\n" not in str(e.value)
        entries.pop(planted)
        (ckpt / CHECKSUM_FILE).write_text(json.dumps(entries))


def _rewrite_index(ckpt: Path, relative_path: str) -> None:
    """Point every entry of the DCP index at `relative_path`, then re-record the checksums (as an attacker with
    write access would), so the refusal under test is the index check, not a checksum mismatch."""
    path = ckpt / "state" / ".metadata"
    md = sharded._MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    md.storage_data = {k: dataclasses.replace(v, relative_path=relative_path) for k, v in md.storage_data.items()}
    path.write_bytes(pickle.dumps(md))
    (ckpt / CHECKSUM_FILE).unlink()
    write_checksums(ckpt, skip=("COMPLETE",))


@pytest.mark.parametrize("planted", ["../../outside/secret.distcp", "ABS"])
def test_a_dcp_index_naming_a_file_outside_is_refused(tmp_path, outside, planted):
    ckpt = make_ckpt(tmp_path / "run", 1)
    _rewrite_index(ckpt, str(outside) if planted == "ABS" else planted)
    opened = []
    real_open = builtins.open
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", lambda f, *a, **k: (opened.append(Path(f)), real_open(f, *a, **k))[1])
        with pytest.raises(CheckpointError, match="not a file of its own directory") as e:
            verify_checkpoint(ckpt)
        with pytest.raises(sharded.ShardedCheckpointError, match="refused"):
            dict(sharded.iter_logical_weights(ckpt))
    assert "\n" not in str(e.value)
    assert all(p.resolve() != outside.resolve() for p in opened)


def test_a_symlink_leading_outside_is_refused_unread(tmp_path, outside, reads):
    ckpt = make_ckpt(tmp_path / "run", 1)
    (ckpt / "tokenizer" / "tokenizer.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link to .*outside the checkpoint") as e:
        verify_checkpoint(ckpt)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="symbolic link"):
        resolve_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="symbolic link"):
        resolve_checkpoint(tmp_path / "run")  # a run dir resolves to its newest checkpoint, refused the same way
    (ckpt / "tokenizer" / "tokenizer.json").unlink()
    (ckpt / "tokenizer" / "inside.json").symlink_to(ckpt / "tokenizer" / "tokenizer_config.json")
    verify_checkpoint(ckpt, only=["train_state.pt"])  # a link that stays inside is fine


def test_missing_checksums_make_a_sharded_checkpoint_damaged_and_resume_falls_back(tmp_path, caplog):
    older = make_ckpt(tmp_path / "run", 1)
    newer = make_ckpt(tmp_path / "run", 2)
    (newer / CHECKSUM_FILE).unlink()
    shard = next((newer / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, and nothing records what it should be
    with pytest.raises(CheckpointError, match=f"{CHECKSUM_FILE} is missing") as e:
        verify_checkpoint(newer)
    assert "\n" not in str(e.value)
    assert _newest_intact(tmp_path / "run") == older  # trainer.resume=auto takes the intact one
    assert "trying the previous checkpoint" in caplog.text and newer.is_dir()  # reported, kept


def test_a_truncated_shard_the_checksums_miss_is_caught_by_the_index(tmp_path):
    ckpt = make_ckpt(tmp_path / "run", 1)
    shard = next((ckpt / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    (ckpt / CHECKSUM_FILE).unlink()
    write_checksums(ckpt, skip=("COMPLETE",))  # re-recorded over the damage
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(ckpt)


def _hf_folder(root: Path, config: dict, tokenizer_config: dict | None = None) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return root


@pytest.mark.parametrize("config,tok,match", [
    ({"model_type": "mixtral", "auto_map": {"AutoModelForCausalLM": "../outside/evil.Model"}}, None, "auto_map"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]},
     {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}, "auto_map"),
    ({"model_type": "mixtral", "trust_remote_code": True}, None, "trust_remote_code"),
    ({"model_type": "mixtral", "architectures": ["MixtralForSequenceClassification"]}, None, "does not convert"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, None, "cannot import HF model_type 'llama'"),
])
def test_hf_folders_asking_for_code_or_an_unconverted_class_are_refused(tmp_path, outside, reads, config, tok,
                                                                        match):
    folder = _hf_folder(tmp_path / "hf", config, tok)
    with pytest.raises(HFConversionError, match=match) as e:
        check_hf_config(folder)
    assert "\n" not in str(e.value)
    assert all(folder.resolve() in p.resolve().parents for p in reads)  # only the folder's own files were read


def test_a_tokenizer_asking_for_remote_code_is_refused_before_transformers_reads_it(tmp_path, outside, reads):
    from train.data.tokenizer import open_tokenizer

    tok = _hf_folder(tmp_path / "tok", {"model_type": "x"}, {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}})
    with pytest.raises(ConfigError, match="asks for code shipped with the tokenizer"):
        open_tokenizer(tok)
    assert all(tok.resolve() in p.resolve().parents for p in reads)
    (tok / "tokenizer_config.json").unlink()
    (tok / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside"):
        open_tokenizer(tok)
