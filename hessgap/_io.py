"""The one way hessgap writes files: atomically (temporary file in the same folder, then a rename), and
one JSON convention for every result, run file and checkpoint summary; the one way it reads ``torch.save``
files (:func:`read_torch`, tensors and plain data only); and the lock that keeps a second process out of a
run folder (:class:`FolderLock`).

An interrupted write never leaves a half-written file under the real name: the old file (or none) stays
until the new one is complete and flushed to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import re
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import HessgapError, one_line


def jsonable(value: Any) -> Any:
    """Plain JSON types: tuples become lists, tensors and arrays lists, non-finite floats None (strict JSON
    has no NaN or infinity; readers treat None as "no number"), objects with ``to_dict()`` their dict,
    dtypes, devices and paths their string."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    module = type(value).__module__ or ""
    if module.startswith("torch"):  # torch.dtype, torch.device
        return str(value)
    return value


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default process group, or (0, 1) without one."""
    dist = sys.modules.get("torch.distributed")  # never imported here just to ask
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, flush it to disk and rename it into place.

    In a distributed run (an initialized default process group) every rank calls the same writes in the
    same order and rank 0 alone writes, between two barriers: the first makes every rank finish what it
    read before the file changes (a rank that looked for a checkpoint after rank 0 wrote it would take
    another branch), the second makes every rank read what rank 0 wrote."""
    path = Path(path)
    _on_rank_zero(lambda: _write_file(path, write))
    return path


def remove(path: str | Path) -> None:
    """Delete a file when it exists; in a distributed run rank 0 alone deletes it, between the same two
    barriers as :func:`atomic_write` (a rank that checked for it must not race another rank's delete)."""
    _on_rank_zero(lambda: Path(path).unlink(missing_ok=True))


def _on_rank_zero(change: Callable[[], None]) -> None:
    """Make a change to the file system: in a distributed run on rank 0 only, between two barriers."""
    rank, world = _rank_and_world()
    if world > 1:
        sys.modules["torch.distributed"].barrier()
    if rank == 0:
        change()
    if world > 1:
        sys.modules["torch.distributed"].barrier()


def _write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def append_text(path: str | Path, text: str, durable: bool = False) -> Path:
    """Append ``text`` to a log file (one ``write`` call; no rename), flushed to disk when ``durable``. In a
    distributed run only rank 0 writes."""
    path = Path(path)
    if _rank_and_world()[0] != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    return path


def dumps(data: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``data`` as strict JSON text (see :func:`jsonable`)."""
    return json.dumps(jsonable(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as strict JSON (2-space indent, trailing newline), atomically."""
    return write_text(path, dumps(data) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or damaged file raises a :class:`HessgapError` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HessgapError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise HessgapError(f"{path} is not valid JSON ({exc}); the file is damaged: delete it to recompute that part") from exc


def save_torch(path: str | Path, payload: Any) -> Path:
    """``torch.save`` the payload atomically, numpy scalars in it as Python numbers: what is written is
    tensors and plain data only, so :func:`read_torch` reads it back."""
    import torch

    payload = _plain_numbers(payload)
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def _plain_numbers(value: Any) -> Any:
    """``value`` with the numpy scalars in its dicts, lists and tuples replaced by Python numbers (a numpy
    scalar pickles through numpy's own functions, which :func:`read_torch` does not admit)."""
    import numpy as np

    if isinstance(value, dict):
        return {key: _plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(item) for item in value]
    if type(value) is tuple:  # torch.Size and named tuples pickle as themselves
        return tuple(_plain_numbers(item) for item in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_torch(path: str | Path, map_location: Any = "cpu", remedy: str = "") -> Any:
    """What a ``torch.save`` file holds, read with ``weights_only=True``: tensors and plain data (dicts, lists,
    tuples, numbers, strings) only.

    Unpickling any other object can run code the file names, so a file holding one is refused, never
    loaded: a :class:`HessgapError` names the file and the objects refused. A damaged file raises one too.
    ``remedy`` says what to do about the file (its writer's way to regenerate it)."""
    import torch

    path = Path(path)
    try:
        # weights_only given explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_objects(path, str(exc))
        if refused:
            raise HessgapError(
                f"{path} holds objects other than tensors and plain data ({', '.join(refused)}); hessgap will not "
                "load it, because unpickling such objects can run code. A file hessgap wrote never holds any: this "
                f"one was written by another program or altered; {remedy}"
            ) from None
        raise HessgapError(f"{path} is corrupt or unreadable (UnpicklingError: {_weights_only_reason(str(exc))}); "
                           f"{remedy}") from None
    except Exception as exc:  # torch raises many kinds on truncated or foreign files
        raise HessgapError(f"{path} is corrupt or unreadable ({one_line(exc)}); {remedy}") from exc


def _refused_objects(path: Path, message: str) -> list[str]:
    """The classes and functions a file names that ``weights_only`` does not admit: torch's static listing
    of a zip-format file, else the one its error message names."""
    import torch

    try:
        refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the legacy (non-zip) format, or no readable pickle in the archive
        refused = []
    return sorted(refused) or re.findall(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)[:1]


def _weights_only_reason(message: str) -> str:
    """The unpickler's own reason in torch's weights-only message, without torch's advice to load the file
    with ``weights_only=False`` (which would run any code in it)."""
    reason = message.rpartition("WeightsUnpickler error:")[2]
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[0] if lines else " ".join(message.split())


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG, atomically (rendered into memory first)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return write_bytes(path, buffer.getvalue())


# -- one process per run folder -------------------------------------------------------------------------

LOCK_FILE = ".hessgap.lock"
# real path of a locked folder -> [descriptor of its lock file (None: unlocked file system), holders here]
_held: dict[str, list] = {}
_held_guard = threading.RLock()  # re-entrant: garbage collection may run a FolderLock.__del__ inside it


class FolderLock:
    """An exclusive lock on a run folder (``fcntl.flock`` on ``<folder>/.hessgap.lock``), held from
    :meth:`acquire` (or ``with``) to :meth:`release`.

    Two processes writing one folder would interleave checkpoints and results: the second gets a
    :class:`HessgapError` at once, naming the holder's pid. The operating system drops the lock when its
    process exits or crashes, so a lock file left behind never blocks anyone. Within one process the lock
    is shared (a command's run folder and the training runs it starts there take it nested) and is given
    up when its last holder releases it. In a distributed run rank 0 holds it for all the ranks (they run
    one command together; only rank 0 writes).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._key: str | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> FolderLock:
        """Take the lock (creating the folder); raises :class:`HessgapError` when another process holds it."""
        if self._key is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        if _rank_and_world()[0] != 0:
            return self
        key = os.path.realpath(self.folder)
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                entry = _held[key] = [_lock(self.folder), 0]
            entry[1] += 1
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _held_guard:
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                if entry[0] is not None:
                    os.close(entry[0])  # closing the descriptor drops the lock
        self._key = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter exit the module's globals may be gone; the OS drops the lock anyway
            pass


def _lock(folder: Path) -> int | None:
    """Lock ``folder``'s lock file for this process and write our pid into it; its descriptor (None where
    the file system cannot lock)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows)
        return None
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: it names the holder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise HessgapError(
                f"run folder {folder} is in use by another hessgap process ({holder}); wait for it to finish or "
                "choose another --out folder (out_dir in Python)"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts): run, but say so
            os.close(fd)
            warnings.warn(f"cannot lock run folder {folder} ({exc}); make sure no other hessgap process writes to "
                          "it", stacklevel=3)
            return None
        if _still_there(fd, folder / LOCK_FILE):
            break
        os.close(fd)  # a run that failed removed its lock file (and folder) after we opened it: lock anew
    # written in place, not through atomic_write: renaming a new file over it would drop the lock
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _still_there(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not deleted or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """"pid N" (and its machine, when another) of the process whose pid the lock file holds."""
    words = os.pread(fd, 256, 0).decode(errors="replace").split()
    if not words:
        return "pid unknown: it has just started"
    host = words[1] if len(words) > 1 else ""
    return f"pid {words[0]}" + (f" on {host}" if host and host != socket.gethostname() else "")


class FolderAdditions:
    """What is added to a run folder from :meth:`mark` on, so that a command that fails before it finished
    anything can take exactly that away again: a config.json of settings that never ran would make the
    corrected rerun look like a change of settings, and be refused.

    Create it before the folder is locked (it notes which of the folder, its parents and its lock file do
    not exist yet) and :meth:`mark` it once locked: from then on no other process writes there. Only rank 0
    of a distributed run changes anything (it holds the lock and writes the files).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._absent = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # deepest first
        self._lock_absent = not (self.folder / LOCK_FILE).exists()
        self._before: set[str] | None = None

    def mark(self) -> None:
        self._before = _entries(self.folder)
        if self._lock_absent:
            self._before.discard(LOCK_FILE)

    def added(self) -> list[str]:
        """Paths relative to the folder (files and folders) added since :meth:`mark`, deepest first."""
        if self._before is None:
            return []
        return sorted(_entries(self.folder) - self._before, key=lambda rel: (-rel.count("/"), rel))

    def remove(self) -> None:
        """Delete what was added, the lock file included: call it while the folder is still locked, and
        :meth:`remove_folders` once the lock is released."""
        if _rank_and_world()[0] != 0:
            return
        for rel in self.added():
            path = self.folder / rel
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)

    def remove_folders(self) -> None:
        """Remove the run folder and its parents where this run made them and they are empty now."""
        if _rank_and_world()[0] != 0:
            return
        for path in self._absent:
            try:
                path.rmdir()
            except OSError:  # not empty (or gone): everything above it stays too
                return


def _entries(folder: Path) -> set[str]:
    """Every file and folder below ``folder``, as paths relative to it."""
    found = set()
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found.update((base / name).as_posix() for name in (*dirs, *files))
    return found
