"""What `model.compile=true` needs besides torch: a compiler for the code torch.compile generates.

torch.compile compiles lazily, at the first forward pass; without a compiler that is a hundred-line
traceback after the data and the model were set up. `check_compile_toolchain` looks the compiler up
the way the backend will, before training starts:
- CPU: TorchInductor builds C++ kernels with ``torch._inductor.cpp_builder.get_cpp_compiler()`` (the
  ``CXX`` environment variable, else ``g++``, run with ``--version``); that function is used
  when it exists, else its order is followed.
- CUDA: Triton builds each kernel's launcher with a C compiler: ``CC``, else ``gcc``, or ``clang``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from distrain.errors import UserError, shorten_text

_INSTALL = ("install one (Debian/Ubuntu: `apt install {apt}`; conda: `conda install -c conda-forge "
            "{conda}`) or point {var} at it, or set model.compile=false")
_PACKAGES = {"CXX": ("g++", "gxx"), "CC": ("gcc", "gcc")}


def check_compile_toolchain(device_type: str) -> str:
    """The compiler torch.compile will use on ``device_type`` ("cpu"/"cuda"); UserError if none."""
    if device_type == "cuda":
        return _c_compiler_for_triton()
    return _cpp_compiler_for_inductor()


def _cpp_compiler_for_inductor() -> str:
    try:
        from torch._inductor import exc
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: follow the same order ourselves
        return _first_working([os.environ.get("CXX", "g++")], "CXX", "a C++ compiler")
    try:
        return get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise _missing("a C++ compiler", os.environ.get("CXX", "g++"), "CXX") from None


def _c_compiler_for_triton() -> str:
    cc = os.environ.get("CC")
    candidates = [cc] if cc else [c for c in (shutil.which("gcc"), shutil.which("clang")) if c]
    return _first_working(candidates or ["gcc"], "CC",
                          "a C compiler (Triton builds its kernels with it)")


def _first_working(candidates: list[str], var: str, what: str) -> str:
    for cc in candidates:
        try:
            subprocess.run([*shlex.split(cc), "--version"], check=True, capture_output=True,
                           timeout=60)
            return cc
        except (OSError, ValueError, subprocess.SubprocessError):
            continue
    raise _missing(what, " or ".join(candidates), var)


def _missing(what: str, tried: str, var: str) -> UserError:
    apt, conda = _PACKAGES[var]
    how = _INSTALL.format(var=var, apt=apt, conda=conda)
    return UserError(f"config key 'model.compile=true' needs {what} and none works (tried "
                     f"'{shorten_text(tried)}'); {how}")
