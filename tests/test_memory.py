"""Memory sizes as users write them (``max_memory=``) and the free memory of a device."""

import pytest

from hessgap._memory import available_bytes, parse_bytes
from hessgap.errors import HessgapError


@pytest.mark.parametrize("value, want", [(1024, 1024), (2.5e9, 2_500_000_000), ("8GB", 8 * 10**9),
                                         ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29), ("2g", 2 * 2**30),
                                         ("100", 100), ("64kb", 64_000)])
def test_parse_bytes(value, want):
    assert parse_bytes(value) == want


@pytest.mark.parametrize("value", [0, -5, "0GB", "8 parsecs", "GB", True, None, [1], float("nan")])
def test_bad_sizes_raise_clear_errors(value):
    with pytest.raises(HessgapError, match="max_memory must be a positive number of bytes"):
        parse_bytes(value)


def test_cpu_free_memory_is_known_on_linux():
    free = available_bytes("cpu")
    assert free is None or free > 0
