"""One run per run directory: an exclusive `flock` on ``<output_dir>/.lock``, held for the run's life.

Invariants:
- Only the main process of a run holds the lock, from before it touches anything in the run directory
  (temporaries, checkpoints, metrics) until the process exits; the kernel drops it when the process
  dies however it dies (kill -9, node loss), so a crash never leaves a stale lock that blocks a resume.
- The lock file is never deleted (deleting it would let a second run lock a new inode while the first
  still holds the old one); its content names the holder (pid, host, start time, command) for the
  message a second run prints, and is rewritten by each new holder.
- Readers (`holder`, `is_running`) only probe with a shared non-blocking lock and never wait.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from distrain.errors import UserError

LOCK_NAME = ".lock"


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(h: dict) -> str:
    if not h:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
    return f"pid {h.get('pid')} on {h.get('host')} since {started} ({h.get('command', '?')})"


class RunLock:
    """``RunLock(run_dir).acquire()`` or a UserError naming the directory and who holds it."""

    def __init__(self, run_dir: Path):
        self.path = lock_path(run_dir)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"config key 'output_dir': cannot create the run lock '{self.path}': "
                            f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"config key 'output_dir': run directory '{self.path.parent}' is in use by "
                            f"{describe(_read(self.path))}; wait for it to finish, stop it, or choose "
                            f"another output_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv[1:])[:300] or "distrain"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_dir: Path) -> Optional[dict]:
    """Who holds the run's lock right now (its recorded pid, host, ...), or None if nobody does."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path) or {"pid": None}
    finally:
        os.close(fd)
    return None


def is_running(run_dir: Path) -> bool:
    """True while some process trains in ``run_dir`` (its main process holds the lock)."""
    return holder(run_dir) is not None
