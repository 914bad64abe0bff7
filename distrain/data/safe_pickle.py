"""A restricted unpickler for the official CIFAR-10 python batches.

The batches are pickles of dicts holding bytes, str, ints, lists and numpy arrays. A plain
``pickle.load`` would call any global the file names (``os.system`` included), so a downloaded or
shared file could run code. ``safe_load`` resolves only a fixed allow-list of globals, mapped to
objects held here; a module name from the file is never imported and nothing else is ever looked up.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any, Callable

import numpy as np

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Python 3 writes bytes at protocol < 3 as ``_codecs.encode(str, 'latin1')``.

    Only that form is honoured: other codecs (zlib, bz2, ...) could inflate a tiny file into gigabytes.
    """
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"refused _codecs.encode call with encoding {encoding!r}")
    return text.encode("latin-1", errors="strict")


def _bytes(*args: Any) -> bytes:
    """``bytes()`` is how protocol 2 writes an empty bytes object; ``bytes(10**12)`` is refused."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise pickle.UnpicklingError("refused builtins.bytes call with arguments")


# (module, name) as written in the file -> the object used. Python 2 pickles (the official
# files) name numpy.core.multiarray; numpy 2 writes numpy._core.multiarray; both mean the same.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # numpy arrays at protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` only knows ``ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}': only numpy arrays and plain containers are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: not a plain data pickle")


def safe_load(fileobj: IO[bytes], encoding: str = "bytes") -> Any:
    """Unpickle ``fileobj`` allowing only numpy arrays/dtypes and plain containers.

    ``encoding='bytes'`` keeps Python 2 ``str`` values (the official files' keys and names) as
    ``bytes``, as the CIFAR-10 website's own loader does. Raises ``pickle.UnpicklingError`` naming
    any other global the file asks for; truncated or garbage input raises whatever the unpickler
    meets (EOFError, UnpicklingError, ValueError, ...).
    """
    return SafeUnpickler(fileobj, encoding=encoding).load()


def safe_loads(data: bytes, encoding: str = "bytes") -> Any:
    """``safe_load`` on a bytes object."""
    return safe_load(io.BytesIO(data), encoding=encoding)
