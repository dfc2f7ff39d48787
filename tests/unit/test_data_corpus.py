"""Document sources and the train/validation split."""
import json

import datasets

import pytest

from train.config.run import DataConfig
from train.data.corpus import expand_paths, load_corpus, split_train_val, stdlib_files


def test_stdlib_files_sorted_capped_and_without_site_packages():
    files = stdlib_files(1.0)
    names = [rel for rel, _ in files]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n for n in names)
    assert 0 < sum(size for _, size in files) <= 1e6
    assert stdlib_files(2.0)[:len(files)] == files  # a larger cap extends the same prefix


def test_stdlib_corpus_is_deterministic(tmp_path):
    cfg = DataConfig(max_corpus_mb=0.3, cache_dir=str(tmp_path))
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a.fingerprint == b.fingerprint and a.documents["text"] == b.documents["text"]
    assert a.documents.column_names == ["text"]
    assert load_corpus(DataConfig(max_corpus_mb=0.4, cache_dir=str(tmp_path))).fingerprint != a.fingerprint


def test_files_source_reads_jsonl_and_txt(tmp_path):
    rows = [{"text": f"json document {i}", "id": i} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.txt").write_text("a text file\nis one document\n")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt")],
                     cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    assert corpus.documents.column_names == ["text"]
    assert corpus.documents["text"] == [r["text"] for r in rows] + ["a text file\nis one document\n"]


def test_files_source_text_field(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "hello", "text": "no"}) + "\n")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "c.jsonl")], text_field="content",
                     cache_dir=str(tmp_path / "cache"))
    assert load_corpus(cfg).documents["text"] == ["hello"]


def test_missing_path_names_data_paths(tmp_path):
    missing = str(tmp_path / "nope" / "*.jsonl")
    with pytest.raises(FileNotFoundError, match=r"data\.paths") as err:
        expand_paths([missing])
    assert missing in str(err.value)
    with pytest.raises(FileNotFoundError, match="data.paths"):
        load_corpus(DataConfig(source="files", paths=[str(tmp_path / "x.txt")], cache_dir=str(tmp_path)))


def test_split_is_disjoint_deterministic_and_near_the_fraction(tmp_path):
    docs = load_corpus(DataConfig(max_corpus_mb=1.0, cache_dir=str(tmp_path))).documents
    train, val = split_train_val(docs, 0.2)
    assert len(train) + len(val) == len(docs)
    assert not set(train["text"]) & set(val["text"])
    assert 0.05 < len(val) / len(docs) < 0.4
    assert split_train_val(docs, 0.2)[1]["text"] == val["text"]
    # Order does not matter: the split follows the text.
    assert sorted(split_train_val(docs.shuffle(seed=0), 0.2)[1]["text"]) == sorted(val["text"])
    # A tiny fraction still holds one document out.
    assert len(split_train_val(docs, 1e-9)[1]) == 1


def test_hf_source_with_a_local_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(4)))
    cfg = DataConfig(source="hf", name=str(tmp_path / "ds"), split="train", text_field="body",
                     cache_dir=str(tmp_path / "cache"))
    assert load_corpus(cfg).documents["text"] == [f"doc {i}" for i in range(4)]
    streamed = load_corpus(DataConfig(**{**cfg.__dict__, "streaming": True}))
    assert [row["text"] for row in streamed.documents] == [f"doc {i}" for i in range(4)]


@pytest.mark.parametrize("streaming", [False, True])
def test_jsonl_files_with_different_extra_fields_read_and_a_bad_line_is_named(tmp_path, streaming):
    from train.data.sources import DataError

    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": 1}\n{"text": "two"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "three", "meta": {"x": [1]}}\n\n{"text": "four", "id": "s"}\n')
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")], cache_dir=str(tmp_path / "c"),
                     streaming=streaming)
    assert [d["text"] for d in load_corpus(cfg).documents] == ["one", "two", "three", "four"]
    for name, line, match in [("c.jsonl", '{"text": "cut', "not a JSON object"),
                              ("d.jsonl", '{"body": "x"}', "has no field 'text'"),
                              ("e.jsonl", '{"text": 5}', "has a int in 'text'")]:
        (tmp_path / name).write_text('{"text": "fine"}\n' + line + "\n")
        cfg = DataConfig(source="files", paths=[str(tmp_path / name)], cache_dir=str(tmp_path / "c"),
                         streaming=streaming)
        with pytest.raises(DataError, match=f"{tmp_path / name}:2: .*{match}") as e:
            list(load_corpus(cfg).documents)
        assert "\n" not in str(e.value)
