"""A run folder: configuration, results JSON, figures, trained models, and resuming where a run stopped.

Layout of a folder written by any ``hessgap`` command::

    <out>/config.json          the command and its settings (checked again on resume)
    <out>/report.md            tables and figures beside the paper's numbers
    <out>/results/<name>.json  one file per finished experiment (skipped when the run is repeated)
    <out>/results/<name>.parts.json   finished pieces of an unfinished experiment
    <out>/figures/<name>.png
    <out>/models/<tag>/        one training run each (per-epoch checkpoints, history.json)

Every file is written through :mod:`hessgap._io` (a temporary file first, renamed into place), so an
interrupted run never leaves a half-written result behind. An open folder is locked
(:class:`hessgap._io.FolderLock`, ``<out>/.hessgap.lock``) until :meth:`RunFolder.close` or the process
ends: a second process on the same folder is refused at once. A command that fails before it finished
anything (no result, no trained epoch) takes away what it added, the folder too when it made it: its
config.json would otherwise refuse the corrected command as a change of settings.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._io import LOCK_FILE, FolderAdditions, FolderLock, append_text, dumps, jsonable, read_json, remove, write_json
from .._version import __version__
from ..errors import HessgapError


def digest(data: dict, length: int = 8) -> str:
    """A short stable hash of a JSON-able dict (names training runs by their configuration)."""
    text = dumps(data, indent=None, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


#: settings that name what was measured (the sha256 of the model files) rather than how
_IDENTITY_KEYS = ("model_sha256",)


def _short(value):
    """Digests cut to 12 characters for a message (also inside a list)."""
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value[:12] if isinstance(value, str) else value


def _difference(key: str, stored, current) -> str:
    if key not in _IDENTITY_KEYS:
        return f"{key}: {stored!r} in the folder, {current!r} now"
    if stored is None:
        return f"{key}: the folder does not record which model file it measured (written by an older hessgap)"
    return (f"{key}: the saved model changed since this folder measured it (sha256 {_short(stored)} then, "
            f"{_short(current)} now): it was trained further or replaced")


def _differences(stored: dict, current: dict) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [_difference(k, stored.get(k), current.get(k)) for k in keys if stored.get(k) != current.get(k)]


class RunFolder:
    """One output folder of a ``hessgap`` command; resumes what an earlier call in it left unfinished."""

    def __init__(self, path, command: str, settings: dict, progress: bool = True, log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.command = command
        self.settings = jsonable(settings)
        self.progress = progress
        self._log = log
        self.memory: dict = {}  # objects this command already loaded (trained networks), by name
        self._lock = FolderLock(self.path)
        self._additions: FolderAdditions | None = None

    # -- layout --------------------------------------------------------------------------------
    @property
    def results_dir(self) -> Path:
        return self.path / "results"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    def figure(self, name: str) -> Path:
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        return self.figures_dir / f"{name}.png"

    def result_path(self, name: str) -> Path:
        return self.results_dir / f"{name}.json"

    # -- configuration -------------------------------------------------------------------------
    def open(self, ignore: tuple[str, ...] = ("device", "experiments"), added: dict | None = None) -> RunFolder:
        """Lock the folder (creating it), and check that an existing one was made by the same command and
        settings; usable as ``with RunFolder(...).open() as folder:``, which closes it.

        Keys in ``ignore`` (where the run executes, which experiments run this time) may change
        between calls; anything else that differs would mix results of two configurations. ``added`` maps
        settings introduced after folders had been written to the value such a folder had: a folder that
        does not record them counts as having that value.
        """
        additions = FolderAdditions(self.path)
        self._lock.acquire()  # before reading config.json: another process may be writing it
        additions.mark()
        self._additions = additions
        try:
            return self._check_and_record(ignore, added or {})
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, failed: bool = False) -> None:
        """Give up the folder's lock (the process's end does too). ``failed``: the command failed; when it
        finished nothing worth keeping (no result, no trained epoch), what it added to the folder is removed,
        and the folder itself when it made it, so that the corrected command starts afresh."""
        additions, self._additions = self._additions, None
        _release(self._lock, additions if failed else None)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    def _check_and_record(self, ignore: tuple[str, ...], added: dict) -> RunFolder:
        config_path = self.path / "config.json"
        if config_path.exists():
            stored = read_json(config_path)
            if stored.get("command") != self.command:
                raise HessgapError(
                    f"{self.path} holds a '{stored.get('command')}' run, not '{self.command}'; "
                    "choose another --out folder"
                )
            new = {k: v for k, v in self.settings.items() if k not in ignore}
            earlier = {k: jsonable(v) for k, v in added.items() if k in new}  # what a folder from before them had
            old = {k: v for k, v in {**earlier, **stored.get("settings", {})}.items() if k not in ignore}
            diff = _differences(old, new)
            if diff:
                raise HessgapError(
                    f"{self.path} holds results of different settings ({'; '.join(diff)}); rerun with the "
                    "same settings to resume, or choose another --out folder to start a new run"
                )
        import torch  # here, not at the top: the command line reads the registry and presets without torch

        write_json(
            config_path,
            {
                "command": self.command,
                "settings": self.settings,
                "hessgap": __version__,
                "torch": torch.__version__,
                "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
                "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        return self

    # -- results -------------------------------------------------------------------------------
    def has_result(self, name: str) -> bool:
        return self.result_path(name).exists()

    def load_result(self, name: str) -> dict | None:
        path = self.result_path(name)
        return read_json(path) if path.exists() else None

    def save_result(self, name: str, result: dict) -> Path:
        path = self.result_path(name)
        write_json(path, result)
        remove(self.results_dir / f"{name}.parts.json")
        return path

    def parts(self, name: str) -> Parts:
        return Parts(self.results_dir / f"{name}.parts.json")

    def results(self) -> dict[str, dict]:
        """Every finished result in the folder, by name."""
        if not self.results_dir.exists():
            return {}
        found = {}
        for path in sorted(self.results_dir.glob("*.json")):
            if not path.name.endswith(".parts.json"):
                found[path.stem] = read_json(path)
        return found

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        append_text(self.path / "run.log", f"{stamp} {message}\n")


@contextlib.contextmanager
def claimed(path) -> Iterator[Path]:
    """Lock the folder ``path`` (creating it) for a command that keeps its own files there, as
    :meth:`RunFolder.open` does: when the command fails before it finished anything, what it added to the
    folder is removed again, and the folder itself when it made it."""
    lock, additions = FolderLock(path), FolderAdditions(path)
    lock.acquire()
    additions.mark()
    try:
        yield Path(path)
    except BaseException:
        _release(lock, additions)
        raise
    _release(lock, None)


def _release(lock: FolderLock, failed: FolderAdditions | None) -> None:
    """Give up ``lock``; ``failed``: the additions of a command that failed, removed unless one is worth keeping."""
    discard = failed is not None and not any(_worth_keeping(failed.folder, rel) for rel in failed.added())
    if discard:
        failed.remove()  # the lock file too, while it is still held
    lock.release()
    if discard:
        failed.remove_folders()


#: what every command writes before it has finished anything: a failed command that added only these leaves
#: nothing behind (the starting-point checkpoint of a training run is made again from its seed)
_SCAFFOLDING = frozenset({"config.json", "run.log", "report.md", LOCK_FILE, "checkpoints/epoch_0000.pt"})


def _worth_keeping(folder: Path, rel: str) -> bool:
    """Whether a path a failed command added to ``folder`` holds finished work (a result, a trained epoch) that
    a rerun resumes from; folders, the scaffolding, interrupted writes' temporary files and a history.json
    without epochs do not."""
    path, name = folder / rel, rel.rsplit("/", 1)[-1]
    if path.is_dir() or (name.startswith(".") and name.endswith(".tmp")):
        return False
    if any(rel == piece or rel.endswith(f"/{piece}") for piece in _SCAFFOLDING):
        return False
    if name == "history.json":
        try:
            return bool(read_json(path).get("history"))
        except (HessgapError, OSError, AttributeError):
            return True  # unreadable: not ours to judge
    return True


class Parts:
    """Finished pieces of an experiment (one sharpness value, one warm start...), saved as they finish."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data: dict = read_json(self.path) if self.path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str, default=None):
        return self._data.get(key, default)

    def put(self, key: str, value) -> Any:
        self._data[key] = jsonable(value)
        write_json(self.path, self._data)
        return self._data[key]

    def compute(self, key: str, fn: Callable[[], Any]) -> Any:
        """The stored value for ``key``, or ``fn()`` stored under it."""
        if key not in self._data:
            self.put(key, fn())
        return self._data[key]
