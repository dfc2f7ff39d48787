"""Fixtures shared by the integration tests."""
import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The tokenizer/data cache of the integration runs, built by the first run that needs each entry. Entries are
    keyed by content (corpus fingerprint, tokenizer settings, sample-index inputs), so runs of different modules
    share them: a BPE tokenizer and the tokenized corpus are built once per session instead of once per module.
    test_train_cli keeps a cache of its own, so a first run from nothing stays covered end to end."""
    return tmp_path_factory.mktemp("cache")
