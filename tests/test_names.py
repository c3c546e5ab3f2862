"""hessgap.names: user spellings normalize to the one canonical name, unknown names list the choices."""

import pytest

from hessgap import names
from hessgap.errors import HessgapError


def test_spellings_normalize():
    assert names.model_name("c2") == "C2"
    assert names.dataset_name("MNIST-1D") == "mnist1d"
    assert names.dataset_name("cifar_10") == "cifar10"
    assert set(names.DATASETS_ON_DISK) <= set(names.DATASET_NAMES)


def test_unknown_names_list_the_choices():
    with pytest.raises(HessgapError, match="unknown model 'F9'; choose one of F1, F2, C1, C2, C3, C4"):
        names.model_name("F9")
    with pytest.raises(HessgapError, match="choose one of digits, mnist1d, mnist, cifar10, cifar100"):
        names.dataset_name("svhn")
