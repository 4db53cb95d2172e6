"""One training process per run directory.

Two processes training into one run directory would overwrite each other's
``last.pt`` and ``best.pt`` (two workers of a queue taking the same run, a
second ``plr train --resume`` started by hand). :func:`run_dir_lock` holds an
advisory ``flock`` on ``RUN_DIR/.lock`` for the whole run; a second process
is refused at once with an error naming the directory and the holder. The
lock dies with its process, so a killed run leaves nothing to clean up. It
is re-entrant within a process (``plr benchmark`` holds it around a run that
``train_run`` locks again). Platforms without ``fcntl`` (Windows) get no lock.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Dict

from .errors import UserError

LOCK = ".lock"
_held: Dict[str, int] = {}  # run directories this process holds: how many times


class RunDirBusy(UserError):
    """Another process holds the run directory's lock."""


@contextmanager
def run_dir_lock(run_dir):
    """Hold the lock of ``run_dir`` (created if needed) while the block runs;
    raises :class:`RunDirBusy` at once if another process holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if _held.get(key):  # this process holds it already
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirBusy(f"run_dir: {run_dir} is being trained by {holder}",
                         "wait for that run to end, or choose another --out") from None
    _held[key] = 1
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node() or 'this machine'}\n")
        f.flush()
        yield
    finally:
        del _held[key]
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
