"""Fixtures shared by the integration tests."""
import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tokenizer/data cache shared by the runs of one test module (built by its first run)."""
    return tmp_path_factory.mktemp("cache")
