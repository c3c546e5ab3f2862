"""Fixtures of the command-line tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    """Commands set torch's thread count (--threads); every test leaves it as it found it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
