"""The decoded-split cache removes what killed writers left behind, and only that."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import subprocess_env
from distrain.data import cache

# A writer SIGKILLed after its temporary is complete, just before the rename.
_WRITER = r"""
import os, sys, time
import numpy as np
from distrain.data import cache

root, flag = sys.argv[1], sys.argv[2]
def stand_still(src, dst):
    open(flag, "w").close()
    time.sleep(600)
os.replace = stand_still
cache.write_cache(root, True, [], False, np.zeros((4, 3, 32, 32), np.uint8), np.zeros(4, np.int64),
                  ["a"])
"""


def _killed_writer(root: Path, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(flag)],
                             env=subprocess_env(DISTRAIN_DATA_CACHE="1"), stderr=subprocess.PIPE)
    try:
        while not flag.exists():
            assert child.poll() is None, child.communicate()[1].decode()[-3000:]
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTRAIN_DATA_CACHE", "1")
    root = tmp_path / "data"
    _killed_writer(root, tmp_path)
    folder = Path(cache.cache_path(str(root), True)).parent
    (dead,) = list(folder.iterdir())
    assert dead.name.startswith(f"train.safetensors.{socket.gethostname()}.")
    assert dead.suffix == ".tmp"
    live = folder / f"test.safetensors.{socket.gethostname()}.{os.getpid()}.0123abcd.tmp"
    other_host = folder / "train.safetensors.elsewhere.example.4194301.89abcdef.tmp"
    old_other_host = folder / "train.safetensors.elsewhere.4194302.aaaabbbb.tmp"
    old_name = folder / "test.safetensors.4999999.ccccdddd.tmp"  # no host (older); > pid_max
    unrelated = folder / "notes.tmp"
    for p in (live, other_host, old_other_host, old_name, unrelated):
        p.write_bytes(b"x")
    hours_ago = time.time() - 2 * cache.STALE_TEMP_S
    os.utime(old_other_host, (hours_ago, hours_ago))
    assert cache.write_cache(str(root), False, [], False, np.zeros((2, 3, 32, 32), np.uint8),
                             np.zeros(2, np.int64), ["a"])
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([live.name, other_host.name, unrelated.name, "test.safetensors"])
