"""Fixtures shared by every tier."""
import pytest


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """The tokenizer/data cache of the one-process runs of `tests/small_runs.py` (a 512-token BPE of a 1 MB slice),
    built by the first run of the session. Its entries are keyed by content, so modules share them instead of
    each training the same tokenizer and tokenizing the same corpus again."""
    return tmp_path_factory.mktemp("small_cache")
