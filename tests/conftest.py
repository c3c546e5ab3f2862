"""Shared pytest set-up for hessgap: markers, seeding, and a skip for CUDA cases on GPU-less machines."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds or runs that take tens of seconds (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA device and hessgap's CUDA kernels")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: faster, and no fight with other processes for the cores.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)
    yield
