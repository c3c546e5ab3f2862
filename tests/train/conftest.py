"""Fixtures of the training tests."""

import pytest

from hessgap.train import load_dataset


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits with hessgap's fixed split, loaded once (runs never modify it)."""
    return load_dataset("digits")
