"""Shared pytest set-up for hessgap: markers, seeding, a skip for CUDA cases on GPU-less machines, and a broken
torchvision hidden from the libraries that import it when present."""

import importlib.util
import sys

import pytest
import torch


def _hide_a_broken_torchvision():
    """A torchvision built for another torch (a CUDA build beside a CPU torch) fails on import, and transformers
    (GPT-2's modules) and Lightning (through torchmetrics) import it whenever it is installed: hide it from them,
    as if it were not installed. A working torchvision is left alone."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - its operators cannot register: the build does not fit this torch
        pass
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision"] = None  # find_spec() now says "not installed" and import raises ImportError
    try:
        import lightning_utilities.core.imports as requirements
    except ImportError:
        return
    from importlib.metadata import PackageNotFoundError

    installed = requirements._version  # Lightning's and torchmetrics' checks read the package metadata

    def version(name):
        if name == "torchvision":
            raise PackageNotFoundError(name)
        return installed(name)

    requirements._version = version


_hide_a_broken_torchvision()


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
