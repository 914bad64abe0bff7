"""The start-up malloc setting: glibc really serves large blocks from the heap afterwards and keeps
the freed heap, and any
choice the user made in the environment is left alone. Each case runs in a fresh interpreter
(mallopt is process-wide and the setting is applied once per process)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from conftest import metrics_events, run_distrain, smoke_args, subprocess_env
from distrain.allocator import ENV_EQUIVALENT, user_choice

# In a fresh process: configure, then malloc 64 MiB (over the largest mmap threshold glibc sets by
# itself, 32 MiB), count the blocks glibc mmapped for it (mallinfo2().hblks), free it and see how much
# of the heap (mallinfo2().arena) glibc gave back to the kernel.
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
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
info = libc.mallinfo2()
libc.free(block)
print(json.dumps({"applied": setting.applied, "skipped": setting.skipped, "same": again is setting,
                  "new_mmapped": info.hblks - before,
                  "heap_returned": info.arena - libc.mallinfo2().arena, "text": setting.describe()}))
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
def test_large_blocks_come_from_the_heap_and_stay_there_once_configured() -> None:
    r = probe()
    assert r["skipped"] is None and r["applied"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}
    assert r["new_mmapped"] == 0, r  # the 64 MiB block came from the heap
    assert r["heap_returned"] == 0, r  # and freeing it (at the heap's top) kept the heap
    assert r["same"]  # a second call changes nothing
    assert "every block from the heap, heap never trimmed" in r["text"]
    assert "DISTRAIN_MALLOC=0" in r["text"]


@needs_glibc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("env, why", [({"DISTRAIN_MALLOC": "0"}, "DISTRAIN_MALLOC=0"),
                                      ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX is set"),
                                      ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
                                       "GLIBC_TUNABLES")])
def test_a_users_choice_keeps_glibcs_behaviour(env, why) -> None:
    r = probe(**env)
    assert r["applied"] == {} and why in r["skipped"]
    assert r["new_mmapped"] == 1, r  # glibc's own default: a 64 MiB block is mmapped
    assert "glibc defaults" in r["text"]


@needs_glibc
@pytest.mark.timeout(120)
def test_the_environment_equivalent_behaves_the_same_without_distrain() -> None:
    """What the benchmarks give the peers and the bare loop (their `malloc on` column)."""
    probe_env = {"DISTRAIN_MALLOC": "0", **ENV_EQUIVALENT}  # the variables do it, not distrain
    r = probe(**probe_env)
    assert r["applied"] == {} and "DISTRAIN_MALLOC=0" in r["skipped"]
    assert r["new_mmapped"] == 0 and r["heap_returned"] == 0, r


def test_user_choice_reads_only_malloc_settings() -> None:
    assert user_choice({}) is None
    assert user_choice({"DISTRAIN_MALLOC": "1", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"}) is None
    assert user_choice({"DISTRAIN_MALLOC": "off"}) == "DISTRAIN_MALLOC=off"
    assert user_choice({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"
    preload = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
    assert user_choice(preload) == "LD_PRELOAD brings another allocator"


@needs_glibc
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_records_the_setting_it_ran_with(tmp_path) -> None:
    """The CLI applies it (every rank runs the CLI) and the run's `start` record says which."""
    on, off = tmp_path / "on", tmp_path / "off"
    run_distrain(["train", *smoke_args(on)], check=True)
    run_distrain(["train", *smoke_args(off)], check=True, env=subprocess_env(DISTRAIN_MALLOC="0"))
    assert metrics_events(on, "start")[0]["malloc"].startswith(
        "malloc: every block from the heap, heap never trimmed")
    assert metrics_events(off, "start")[0]["malloc"] == "malloc: glibc defaults (DISTRAIN_MALLOC=0)"
