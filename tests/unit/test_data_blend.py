"""The blended sample index (train/data/blend.py): shares within one sample at every prefix, prefix stability,
per-epoch reshuffles, and per-source counts at any position."""
import numpy as np
import pytest

from train.data import blend
from train.data.blend import BlendIndex, blend_source_ids, build_blend_index, normalise


def max_deviation(weights, n, chunk=blend.CHUNK):
    ids = blend_source_ids(weights, n, chunk=chunk)
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[ids], axis=0)
    return np.abs(counts - np.arange(1, n + 1)[:, None] * normalise(weights)[None]).max()


@pytest.mark.parametrize("num_sources", [2, 3, 4])
def test_every_prefix_is_within_one_sample_of_its_share(num_sources):
    rng = np.random.default_rng(num_sources)
    cases = [[1.0] * num_sources, [0.97] + [0.01] * (num_sources - 1)]
    cases += [list(rng.dirichlet(np.ones(num_sources) * a)) for a in (0.2, 1.0, 5.0) for _ in range(40)]
    if num_sources == 2:
        cases.append([0.8, 0.2])
    for w in cases:
        assert max_deviation(w, 3000, chunk=701) < 1.0, w


def test_two_sources_stay_within_half_a_sample():
    assert max_deviation([0.8, 0.2], 5000) <= 0.5
    assert max_deviation([0.3, 0.7], 5000) <= 0.5


def test_prefix_stable_whatever_the_length_and_chunking():
    w = [0.5, 0.3, 0.15, 0.05]
    full = blend_source_ids(w, 10_000)
    assert np.array_equal(blend_source_ids(w, 3_333, chunk=97), full[:3_333])
    assert np.array_equal(blend_source_ids(w, 10_000, chunk=1_000), full)


def test_windows_repeat_reshuffled_per_epoch_and_counts_at_any_position(tmp_path, monkeypatch):
    monkeypatch.setattr(blend, "CHUNK", 64)  # several stored count rows
    n, windows = 1000, [7, 40]
    d = build_blend_index(tmp_path, "k", [0.5, 0.5], windows, n, seed=3, meta={})
    index = BlendIndex(d)
    src, win = np.asarray(index.source_ids), np.asarray(index.window_ids)
    small = win[src == 0]  # 500 samples of a 7-window source: ~71 epochs
    epochs = small[:7 * 71].reshape(71, 7)
    assert all(sorted(e) == list(range(7)) for e in epochs)  # every epoch is a permutation
    assert len({tuple(e) for e in epochs}) > 10  # reshuffled
    assert index.meta["samples_per_source"] == [500, 500]
    for stop in (0, 1, 63, 64, 65, 128, 999, 1000):
        assert index.samples_per_source(stop).tolist() == np.bincount(src[:stop], minlength=2).tolist()
    # the same arguments find the cached index; the arrays are memory maps
    assert build_blend_index(tmp_path, "k", [0.5, 0.5], windows, n, seed=3, meta={}) == d
    assert isinstance(index.window_ids, np.memmap)


def test_without_weights_sources_weigh_by_their_windows():
    from train.config.run import DataConfig
    from train.data.sources import resolve_weights

    assert resolve_weights(DataConfig(source="tokens", paths=["a", "b"]), [30, 10]) == [0.75, 0.25]
    assert resolve_weights(DataConfig(source="tokens", paths=["a", "b"], weights=[1.0, 3.0]), [30, 10]) == [0.25, 0.75]
