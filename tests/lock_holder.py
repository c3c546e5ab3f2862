"""A second process that holds a run folder's lock, for the tests that two processes never share a folder."""

import contextlib
import subprocess
import sys

_HOLD = """
import sys
from hessgap._io import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin (or kills us)
"""


@contextlib.contextmanager
def other_process_holding(folder):
    """Run a process that locks ``folder`` and holds it while the block runs; yields that process."""
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.strip() == "locked", f"the holding process did not start: {line!r}"
        yield process
    finally:
        if process.poll() is None:
            process.stdin.close()
            process.wait(timeout=60)
