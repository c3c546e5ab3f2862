"""A tracker's run folder (``Tracker(..., out=folder)``): what it measured, one JSON line per record, and enough to
resume.

- ``config.json``: the measures and the options their numbers depend on; a folder refuses a tracker that
  would measure differently (``every`` may change: it only says when).
- ``history.jsonl``: one record per line, appended as it is measured. A line cut short by an interruption is
  dropped on resume (with a warning); any other damage raises.
- ``warm.pt``: the warm-start state (the last top Ritz vectors and critical learning rates), so a resumed run
  starts warm; written after each record for models up to :data:`WARM_EVERY_RECORD` parameters, else when the
  tracker closes (a lost warm start costs one cold record, nothing else).
- ``tracking.png``: every measure against the step, redrawn after each record.

The folder is locked while a tracker uses it (:class:`hessgap._io.FolderLock`). In a distributed run rank 0
writes and every rank reads (the folder must be on a file system they share, as for training checkpoints).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .._io import (
    FolderLock,
    append_text,
    dumps,
    read_json,
    read_torch,
    save_torch,
    write_bytes,
    write_json,
    write_text,
)
from ..errors import HessgapError
from .plot import render

CONFIG_FILE, HISTORY_FILE, WARM_FILE, FIGURE_FILE = "config.json", "history.jsonl", "warm.pt", "tracking.png"
FORMAT = 1
#: settings that may differ when a folder is resumed (they do not change what a record holds)
RESUMABLE = frozenset({"every"})
#: up to this many numbers in the warm-start state, it is written after every record (4 M: 16 MB in float32)
WARM_EVERY_RECORD = 4 * 2**20


class TrackerFolder:
    """The run folder of one tracker; ``settings`` are what its records depend on (JSON-ready)."""

    def __init__(self, path, settings: dict, writer: bool):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise HessgapError(f"out={self.path} is a file; the tracker needs a folder for its records")
        self.settings = {"format": FORMAT, **settings}
        self.writer = writer  # whether this process draws the figure (rank 0)
        self.lock = FolderLock(self.path).acquire()
        try:
            self._check_or_write_config()
        except BaseException:
            self.lock.release()
            raise

    def _check_or_write_config(self) -> None:
        config = self.path / CONFIG_FILE
        if not config.exists():
            write_json(config, self.settings)
            return
        saved = read_json(config)
        for key in sorted(set(saved) | set(self.settings)):
            if key not in RESUMABLE and saved.get(key) != json.loads(dumps(self.settings.get(key))):
                raise HessgapError(
                    f"{self.path} holds records of a tracker with {key}={saved.get(key)!r}, but this one has "
                    f"{key}={self.settings.get(key)!r}; use another out folder (or the same settings to resume)"
                )
        if saved != json.loads(dumps(self.settings)):
            write_json(config, self.settings)  # an allowed change (every): the folder says what runs now

    def load(self) -> tuple[list[dict], dict]:
        """(the records so far, in step order; the warm-start state)."""
        history = self._read_history()
        warm = {}
        if (self.path / WARM_FILE).exists():
            try:
                warm = read_torch(self.path / WARM_FILE, remedy="delete it: the next record then starts cold")
            except HessgapError as exc:  # a damaged or foreign warm start only costs products: start cold
                warnings.warn(f"{exc}; the next record starts cold", stacklevel=3)
        return history, warm

    def _read_history(self) -> list[dict]:
        records, cut = _parse(self.path / HISTORY_FILE)
        if cut:
            warnings.warn(f"{self.path / HISTORY_FILE}: the last line is incomplete ({cut}); dropped, its step is "
                          "measured again", stacklevel=4)
            self.rewrite(records)
        return records

    def append(self, record: dict) -> None:
        append_text(self.path / HISTORY_FILE, dumps(record, indent=None) + "\n")

    def rewrite(self, history: list[dict]) -> None:
        """Replace the whole history (after records of a superseded trajectory were dropped), atomically."""
        write_text(self.path / HISTORY_FILE, "".join(dumps(r, indent=None) + "\n" for r in history))

    def save(self, history: list[dict], warm: dict) -> None:
        """The figure (and a small warm-start state), after a record."""
        if sum(v.numel() for v in warm.values() if isinstance(v, torch.Tensor)) <= WARM_EVERY_RECORD:
            self.save_warm(warm)
        write_bytes(self.path / FIGURE_FILE, render(history, title="hessgap tracker") if self.writer else b"")

    def save_warm(self, warm: dict) -> None:
        save_torch(self.path / WARM_FILE, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in warm.items()})

    def close(self, warm: dict) -> None:
        try:
            if warm:
                self.save_warm(warm)
        finally:
            self.lock.release()


def read_records(folder) -> list[dict]:
    """The records in a tracker's folder, in step order (none when it holds none); a cut last line is left out."""
    return _parse(Path(folder) / HISTORY_FILE)[0]


def _parse(path: Path) -> tuple[list[dict], str]:
    """(the records of a history file in step order, why its last line was left out or "")."""
    if not path.exists():
        return [], ""
    lines = path.read_text(encoding="utf-8").splitlines()
    records, cut = [], ""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record")
        except ValueError as exc:
            if number < len(lines):
                raise HessgapError(f"{path} line {number} is damaged ({exc}); delete the folder to start over") from exc
            cut = str(exc)  # the last line of an interrupted append
            break
        records.append(record)
    return sorted(records, key=lambda r: r["step"]), cut
