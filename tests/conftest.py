"""Suite-wide collection rules.

Under pytest-xdist (`make test` runs `pytest -n 2 --dist loadgroup`), every test that launches ranks or
training processes (tests/distributed, tests/integration) runs on one worker, one after another, while the
in-process tests share both workers: two multi-rank tests at once would put up to eight gloo ranks on two cores,
where lockstep collectives and the launchers' timeouts misbehave. Without xdist the marker changes nothing.
"""
import pytest

RANKED_TIERS = ("distributed", "integration")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.parent.name in RANKED_TIERS:
            item.add_marker(pytest.mark.xdist_group("ranks"))
