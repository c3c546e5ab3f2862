"""Fixtures of the experiment tests."""

import pytest
import torch

from hessgap.experiments import RunFolder, reproduce

from tiny_runs import tiny_settings


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """Every experiment of the paper on tiny networks, run once for all the tests that check one of them:
    (run folder, settings, outcome of :func:`reproduce`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("reproduce")
        settings = tiny_settings()
        folder = RunFolder(path, "reproduce", settings.to_dict(), progress=False).open()
        outcome = reproduce(folder, settings)
    finally:
        torch.set_num_threads(before)
    return path, settings, outcome
