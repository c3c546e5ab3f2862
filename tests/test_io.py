"""hessgap._io: atomic writes leave the old file on failure, one strict JSON convention, the run-folder lock
and what a failed command added to a folder."""

import json
import math
import os
import shutil

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
    assert torch.equal(torch.load(path, weights_only=True)["w"], payload["w"])
    assert torch.equal(_io.read_torch(path)["w"], payload["w"])


def test_save_torch_writes_numpy_numbers_as_python_numbers(tmp_path):
    import numpy as np

    payload = {"lr": np.float64(0.5), "steps": [np.int64(3), (np.float32(0.25), "x")], "size": torch.Size([2, 3]),
               "w": torch.ones(2)}
    read = _io.read_torch(_io.save_torch(tmp_path / "c.pt", payload))  # numpy's scalars would be refused
    assert read["lr"] == 0.5 and type(read["lr"]) is float and type(read["steps"][0]) is int
    assert read["steps"][1] == (0.25, "x") and read["size"] == torch.Size([2, 3]) and torch.equal(read["w"], torch.ones(2))


@pytest.mark.parametrize("zip_format", [True, False])
def test_read_torch_refuses_objects_other_than_tensors_and_plain_data(tmp_path, zip_format):
    from crafted import RunsCode

    marker = tmp_path / "code-ran"
    torch.save({"w": torch.ones(2), "notes": [RunsCode(marker)]}, tmp_path / "c.pt",
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(HessgapError, match=r"c\.pt holds objects other than tensors and plain data \((builtins\.)?exec\)"
                                           r"; hessgap will not load it.*can run code.*; regenerate it"):
        _io.read_torch(tmp_path / "c.pt", remedy="regenerate it")
    assert not marker.exists()


def test_read_torch_names_a_damaged_file_without_advising_to_run_it(tmp_path):
    path = _io.save_torch(tmp_path / "c.pt", {"w": torch.ones(3)})
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(HessgapError, match=r"c\.pt is corrupt or unreadable \(RuntimeError: .*\); write it again"):
        _io.read_torch(path, remedy="write it again")
    path.write_bytes(b"not a torch file")
    with pytest.raises(HessgapError, match=r"c\.pt is corrupt or unreadable \(UnpicklingError: .*\); write it again") as info:
        _io.read_torch(path, remedy="write it again")
    assert "weights_only" not in str(info.value)  # torch's advice to load it with weights_only=False is left out
    with pytest.raises(HessgapError, match="missing.pt is corrupt or unreadable"):
        _io.read_torch(tmp_path / "missing.pt")


def test_save_figure_writes_a_png(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    path = _io.save_figure(figure, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the run-folder lock -----------------------------------------------------------------------------

def test_a_folder_locked_by_another_process_is_refused_at_once(tmp_path):
    from lock_holder import other_process_holding

    with other_process_holding(tmp_path / "run") as holder:
        with pytest.raises(HessgapError, match=rf"run folder .*run is in use by another hessgap process \(pid "
                                               rf"{holder.pid}\); wait for it to finish or choose another --out"):
            _io.FolderLock(tmp_path / "run").acquire()
    with _io.FolderLock(tmp_path / "run") as lock:  # released when the other process ended
        assert lock.held


def test_a_crashed_holder_leaves_no_lock(tmp_path):
    from lock_holder import other_process_holding

    with other_process_holding(tmp_path) as holder:
        holder.kill()
        holder.wait(timeout=60)
        assert (tmp_path / _io.LOCK_FILE).is_file()  # the file stays, the lock went with the process
        with _io.FolderLock(tmp_path) as lock:
            assert lock.held


def test_the_lock_is_shared_within_a_process_until_its_last_holder_releases(tmp_path):
    import subprocess
    import sys

    def other_process_can_lock() -> bool:
        probe = "import sys; from hessgap._io import FolderLock; FolderLock(sys.argv[1]).acquire()"
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True).returncode == 0

    outer = _io.FolderLock(tmp_path).acquire()
    inner = _io.FolderLock(tmp_path / "." / "").acquire()  # nested, through another spelling of the path
    inner.release()
    assert not other_process_can_lock()
    outer.release()
    outer.release()  # releasing twice is harmless
    assert other_process_can_lock()


def test_a_lock_file_removed_between_open_and_lock_is_not_taken(tmp_path, monkeypatch):
    """A failed run removes the lock file it made while still holding it; a process that opened the file just
    before must not lock the deleted file (two processes would then both hold "the" lock): it locks anew."""
    import fcntl

    real_flock, calls = fcntl.flock, []

    def flock_after_a_removal(fd, operation):
        calls.append(fd)
        if len(calls) == 1:  # the other run removes the file (and its folder) after our open
            (tmp_path / "run" / _io.LOCK_FILE).unlink()
            (tmp_path / "run").rmdir()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_removal)
    (tmp_path / "run").mkdir()
    with _io.FolderLock(tmp_path / "run") as lock:
        assert lock.held and len(calls) == 2
        held = os.fstat(_io._held[os.path.realpath(tmp_path / "run")][0])
        assert os.path.samestat(held, os.stat(tmp_path / "run" / _io.LOCK_FILE))  # the file that is there now


def test_folder_additions_are_what_came_after_the_mark(tmp_path):
    (tmp_path / "a" / "old").mkdir(parents=True)
    additions = _io.FolderAdditions(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "c" / "d").mkdir(parents=True)
    additions.mark()
    (tmp_path / "a" / "b" / "c" / "d" / "new.json").write_text("{}")
    (tmp_path / "a" / "b" / "c" / "e").mkdir()
    assert additions.added() == ["d/new.json", "e"]  # deepest first
    additions.remove()
    additions.remove_folders()
    assert (tmp_path / "a" / "b" / "c" / "d").is_dir()  # there at the mark: stays, and so do the folders above it
    shutil.rmtree(tmp_path / "a" / "b" / "c" / "d")
    additions.remove_folders()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["old"]  # b and c were made after the start
