"""glibc malloc behaviour chosen at start-up instead of left to chance.

Why: a training step frees and re-allocates the same buffers every step (activations, gradients,
im2col workspaces: hundreds of kB to MBs on a CPU). glibc serves a block above its mmap threshold
(128 KiB at start) with a fresh ``mmap`` and gives it back with ``munmap`` when freed, and returns
the heap's free top to the kernel once it exceeds the trim threshold, so every step page-faults
freshly zeroed memory (system time, not compute). glibc raises both thresholds by itself the first
time it frees a large mmapped block, which happens at a moment nobody chose (the first evaluation's
batches, say): the same run then gets faster half-way through. Setting the thresholds once at
start-up makes that fast state the state of step one.

Invariants:

- Only glibc is touched (``gnu_get_libc_version`` present); on any other C library this does
  nothing.
- The user wins: ``DISTRAIN_MALLOC=0`` keeps glibc's defaults, and if any malloc tunable is already
  set in the environment (``MALLOC_*`` variables, ``glibc.malloc`` in ``GLIBC_TUNABLES``, another
  allocator in ``LD_PRELOAD``) distrain sets nothing, so an explicit choice is never
  half-overridden.
- Call it once per process, first thing (every rank runs the CLI, so every rank calls it); calling
  it again changes nothing. Forked children (DataLoader workers) inherit the settings with the heap.
- Cost: up to ``TRIM_THRESHOLD`` bytes of freed heap stay mapped in the process (counted in its
  RSS), and blocks below ``MMAP_THRESHOLD`` come from the heap. The arena count (``M_ARENA_MAX``) is
  left alone: torch's intra-op threads rarely allocate, so a cap buys no memory and could add lock
  contention.
- This module imports nothing but the standard library.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MIB = 1 << 20
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 * MIB
TRIM_THRESHOLD = 256 * MIB

SETTINGS = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD)}
# The same settings as environment variables, for processes that do not run distrain (benchmarks).
ENV_EQUIVALENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                  "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
OPT_OUT_VAR = "DISTRAIN_MALLOC"


@dataclass(frozen=True)
class AllocatorSetting:
    """What `configure_allocator` did: the parameters it set, or why it set none."""

    applied: dict = field(default_factory=dict)  # mallopt name -> value
    skipped: Optional[str] = None

    def describe(self) -> str:
        if self.skipped:
            return f"malloc: glibc defaults ({self.skipped})"
        parts = ", ".join(f"{k[2:].lower().replace('_', ' ')} {v // MIB} MiB"
                          for k, v in self.applied.items())
        return f"malloc: {parts} ({OPT_OUT_VAR}=0 keeps glibc's defaults)"


_done: Optional[AllocatorSetting] = None


def user_choice(environ: Mapping[str, str]) -> Optional[str]:
    """Why the environment rules out distrain's setting, or None."""
    if environ.get(OPT_OUT_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT_VAR}={environ[OPT_OUT_VAR]}"
    own = sorted(k for k in environ if k.startswith("MALLOC_"))  # (MALLOC_ARENA_MAX: no trailing _)
    if own:
        return f"{own[0]} is set"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    if "malloc" in environ.get("LD_PRELOAD", ""):  # libjemalloc, libtcmalloc, libmimalloc
        return "LD_PRELOAD brings another allocator"
    return None


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it (musl, macOS, Windows do not)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def configure_allocator(environ: Optional[Mapping[str, str]] = None) -> AllocatorSetting:
    """Fix glibc's mmap and trim thresholds for this process (module docstring); idempotent."""
    global _done
    if _done is not None:
        return _done
    reason = user_choice(os.environ if environ is None else environ)
    libc = None if reason else _glibc()
    if reason is None and libc is None:
        reason = "not glibc"
    if reason is not None:
        _done = AllocatorSetting(skipped=reason)
        return _done
    applied = {}
    for name, (param, value) in SETTINGS.items():
        if libc.mallopt(param, value) == 1:  # mallopt returns 1 on success, 0 for a refused value
            applied[name] = value
    refused = None if applied else "mallopt refused the values"
    _done = AllocatorSetting(applied=applied, skipped=refused)
    return _done
