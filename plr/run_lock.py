"""One training process per run directory.

Two processes training into one run directory would overwrite each other's
``last.pt`` and ``best.pt`` (two workers of a queue taking the same run, a
second ``plr train --resume`` started by hand). :func:`run_dir_lock` holds an
advisory ``flock`` on ``RUN_DIR/.lock`` for the whole run; a second process
is refused at once with an error naming the directory and the holder. The
lock dies with its process, so a killed run leaves nothing to clean up.
Platforms without ``fcntl`` (Windows) get no lock.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

LOCK = ".lock"


@contextmanager
def run_dir_lock(run_dir):
    """Hold the lock of ``run_dir`` (created if needed) while the block runs."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"run_dir: {run_dir} is being trained by {holder}",
                        "wait for that run to end, or choose another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node() or 'this machine'}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
