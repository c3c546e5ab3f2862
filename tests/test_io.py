"""hessgap._io: atomic writes leave the old file on failure, and one strict JSON convention."""

import json
import math

import pytest
import torch

from hessgap import _io
from hessgap.errors import HessgapError


def test_write_json_is_strict_and_converts_tensors_tuples_and_nonfinite(tmp_path):
    path = _io.write_json(tmp_path / "sub" / "r.json",
                          {"a": (1, 2.5), "t": torch.tensor([1.0, 2.0]), "nan": math.nan, "inf": -math.inf,
                           "dtype": torch.float32, "device": torch.device("cpu"), "path": tmp_path})
    data = json.loads(path.read_text())
    assert data == {"a": [1, 2.5], "t": [1.0, 2.0], "nan": None, "inf": None, "dtype": "torch.float32",
                    "device": "cpu", "path": str(tmp_path)}
    assert path.read_text().endswith("\n")
    assert _io.read_json(path) == data


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    _io.write_json(path, {"old": 1})

    def broken(handle):
        handle.write(b"{half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        _io.atomic_write(path, broken)
    assert _io.read_json(path) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_read_json_names_a_damaged_or_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HessgapError, match="bad.json.*damaged"):
        _io.read_json(bad)
    with pytest.raises(HessgapError, match="missing.json does not exist"):
        _io.read_json(tmp_path / "missing.json")


def test_save_torch_round_trips(tmp_path):
    payload = {"w": torch.arange(4.0)}
    path = _io.save_torch(tmp_path / "c.pt", payload)
    assert torch.equal(torch.load(path)["w"], payload["w"])


def test_save_figure_writes_a_png(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    path = _io.save_figure(figure, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
