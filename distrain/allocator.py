"""glibc malloc behaviour chosen at start-up instead of left to chance.

Why: a training step frees and re-allocates the same buffers every step (activations, gradients,
im2col workspaces: hundreds of kB to hundreds of MB on a CPU). glibc serves a block above its mmap
threshold (128 KiB at start, raised by itself up to 32 MiB) with a fresh ``mmap`` and gives it back
with ``munmap`` when freed, and it returns the heap's free top to the kernel once that exceeds the
trim threshold; either way the next step page-faults freshly zeroed memory (system time, not
compute). Measured on a 2-core CPU: VGG16 at 32x32, batch 32, faulted ~237,000 pages and spent
~0.5 s of system time per step (its first classifier layer's 411 MB gradient is above any mmap
threshold glibc allows), and CIFAR10-quick got faster half-way through a run, when glibc raised its
thresholds at a moment nobody chose (the first evaluation's batches). Serving every block from the
heap and never trimming it makes the fast state the state of step one, for every model size.

Invariants:

- Only glibc is touched (``gnu_get_libc_version`` present); on any other C library this does
  nothing.
- The user wins: ``DISTRAIN_MALLOC=0`` keeps glibc's defaults, and if any malloc tunable is already
  set in the environment (``MALLOC_*`` variables, ``glibc.malloc`` in ``GLIBC_TUNABLES``, another
  allocator in ``LD_PRELOAD``) distrain sets nothing, so an explicit choice is never
  half-overridden.
- Call it once per process, first thing (every rank runs the CLI, so every rank calls it); calling
  it again changes nothing. Forked children (DataLoader workers) inherit the settings with the heap.
- Cost: memory freed by the process stays mapped (counted in its RSS) and is reused by the next
  allocations, so a process holds its peak heap until it exits; a training process reaches that peak
  again every step, and a one-off peak (loading a checkpoint, say) is reused by the steps after it.
  The arena count (``M_ARENA_MAX``) is left alone: torch's intra-op threads rarely allocate, so a
  cap buys no memory and could add lock contention.
- This module imports nothing but the standard library.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# mallopt(3): "Setting this parameter to 0 disables the use of mmap(2) for servicing large
# allocation requests" (M_MMAP_MAX) and "Setting M_TRIM_THRESHOLD to -1 disables trimming
# completely". A refused value makes mallopt return 0; that parameter is then left out.
SETTINGS = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1)}
# The same settings as environment variables, for processes that do not run distrain (benchmarks).
ENV_EQUIVALENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**64 - 1)}
OPT_OUT_VAR = "DISTRAIN_MALLOC"


@dataclass(frozen=True)
class AllocatorSetting:
    """What `configure_allocator` did: the parameters it set, or why it set none."""

    applied: dict = field(default_factory=dict)  # mallopt name -> value
    skipped: Optional[str] = None

    def describe(self) -> str:
        if self.skipped:
            return f"malloc: glibc defaults ({self.skipped})"
        what = {"M_MMAP_MAX": "every block from the heap", "M_TRIM_THRESHOLD": "heap never trimmed"}
        parts = ", ".join(what[k] for k in self.applied)
        return f"malloc: {parts} ({OPT_OUT_VAR}=0 keeps glibc's defaults)"


_done: Optional[AllocatorSetting] = None


def describe_current() -> str:
    """What this process runs with, for the run's `start` record."""
    if _done is None:
        return "malloc: glibc defaults (not configured: distrain used as a library)"
    return _done.describe()


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
    """Serve every block from the heap and never trim it, in this process (module docstring);
    idempotent."""
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
