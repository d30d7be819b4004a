"""One run per run directory: an exclusive ``fcntl.flock`` on ``run_dir/.lock``.

The lock file holds the holder's PID and host, so that a second run can say who has the
directory. The kernel releases a flock when its process ends, however it ends (SIGKILL,
OOM killer), so a killed run leaves no stale lock: the file stays, the lock does not.
(flock is per host on most network file systems: two hosts sharing a run_dir over NFS may
not see each other's lock.)
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from opd.errors import UserError

LOCK_FILE = ".lock"


def acquire_run_lock(run_dir: str | Path) -> IO:
    """Lock ``run_dir`` (created if missing) for this process; the open lock file is the
    lock: close it (:func:`release_run_lock`) to release. Raises :class:`UserError` naming
    the holder when another run has it."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its PID yet"
        f.close()
        raise UserError(
            f"run_dir {run_dir} is in use by another run ({holder}); wait for it to end, or choose another run_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    return f


def release_run_lock(lock: IO | None, remove_dir: bool = False) -> None:
    """Release a lock from :func:`acquire_run_lock` (None or already released: nothing).
    ``remove_dir``: also remove the lock file and then the run dir if that left it empty
    (a run that failed at start leaves nothing behind)."""
    if lock is None or lock.closed:
        return
    if remove_dir:
        Path(lock.name).unlink(missing_ok=True)  # while still held
    lock.close()
    if remove_dir:
        try:
            Path(lock.name).parent.rmdir()
        except OSError:
            pass
