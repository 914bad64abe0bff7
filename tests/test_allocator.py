"""The start-up malloc setting: glibc really serves large blocks from the heap afterwards, and any
choice the user made in the environment is left alone. Each case runs in a fresh interpreter
(mallopt is process-wide and the setting is applied once per process)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from conftest import subprocess_env
from distrain.allocator import MMAP_THRESHOLD, user_choice

# In a fresh process: configure, then malloc 4 MiB (over glibc's default 128 KiB mmap threshold) and
# count the blocks glibc mmapped for it (mallinfo2().hblks).
PROBE = r"""
import ctypes, json
from distrain.allocator import configure_allocator
setting = configure_allocator()
again = configure_allocator()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
print(json.dumps({"applied": setting.applied, "skipped": setting.skipped, "same": again is setting,
                  "new_mmapped": libc.mallinfo2().hblks - before, "text": setting.describe()}))
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL(None)
        return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")
    except OSError:
        return False


needs_glibc = pytest.mark.skipif(not _glibc_with_mallinfo2(), 
                                 reason="needs glibc >= 2.33 (mallinfo2)")


def probe(**env) -> dict:
    e = subprocess_env(**env)
    ours = ("DISTRAIN_MALLOC", "GLIBC_TUNABLES")
    for k in [k for k in e if k.startswith("MALLOC_") or k in ours]:
        if k not in env:
            e.pop(k)
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


@needs_glibc
@pytest.mark.timeout(120)
def test_large_blocks_come_from_the_heap_once_configured() -> None:
    r = probe()
    assert r["skipped"] is None and r["applied"]["M_MMAP_THRESHOLD"] == MMAP_THRESHOLD
    assert r["new_mmapped"] == 0, r
    assert r["same"]  # a second call changes nothing
    assert "mmap threshold 32 MiB" in r["text"] and "DISTRAIN_MALLOC=0" in r["text"]


@needs_glibc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("env, why", [({"DISTRAIN_MALLOC": "0"}, "DISTRAIN_MALLOC=0"),
                                      ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX is set"),
                                      ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
                                       "GLIBC_TUNABLES")])
def test_a_users_choice_keeps_glibcs_behaviour(env, why) -> None:
    r = probe(**env)
    assert r["applied"] == {} and why in r["skipped"]
    assert r["new_mmapped"] == 1, r  # glibc's own default: a 4 MiB block is mmapped
    assert "glibc defaults" in r["text"]


def test_user_choice_reads_only_malloc_settings() -> None:
    assert user_choice({}) is None
    assert user_choice({"DISTRAIN_MALLOC": "1", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"}) is None
    assert user_choice({"DISTRAIN_MALLOC": "off"}) == "DISTRAIN_MALLOC=off"
    assert user_choice({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"
    preload = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
    assert user_choice(preload) == "LD_PRELOAD brings another allocator"
