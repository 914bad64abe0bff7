"""File-system primitives every writer in distrain uses: atomic writes, fsync, directory probes.

Invariants:
- ``atomic_write_bytes`` leaves either the old file or the complete new one under ``path``, never a
  half-written one: the data goes to a temporary file in the same directory, is fsynced, then renamed.
- New files get the modes any file the user creates gets (0666 minus the umask), not mkstemp's 0600:
  colleagues on a shared cluster can read an exported model or a checkpoint pointer.
- Temporary names start with ``TEMP_PREFIX`` plus the target's name, so `clean_temporaries` can remove
  what a killed writer left behind without touching anything else.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from distrain.errors import UserError

TEMP_PREFIX = ".tmp-"


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no thread writes files meanwhile at
    # the points this is called, and the value is the same before and after).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new regular file under the current umask (e.g. 0644 for umask 022)."""
    return 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it (no rename: the caller commits)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_tree(path: Path) -> None:
    """Delete a directory tree or file without following a symlink out of it."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_temporaries(directory: Path, prefixes: Iterable[str] = (TEMP_PREFIX,)) -> list[Path]:
    """Remove what interrupted writers left in ``directory`` (names starting with ``prefixes``)."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    prefixes = tuple(prefixes)
    for p in directory.iterdir():
        if p.name.startswith(prefixes):
            remove_tree(p)
            removed.append(p)
    return removed


def describe_os_error(e: BaseException) -> str:
    """The short reason of an OSError ("No space left on device"), or the first line of another error."""
    why = getattr(e, "strerror", None)
    if why:
        return why
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (and parents) and prove a file can be created in it; UserError naming ``what``.

    ``what`` is how the message names the culprit, e.g. "config key 'output_dir'". Root ignores
    permission bits, so the probe really creates (and removes) a file instead of asking os.access.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: '{path}' exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=f"{TEMP_PREFIX}probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise UserError(f"{what}: a part of '{path}' is a file, not a directory") from None
        raise UserError(f"{what}: cannot write to '{path}': {describe_os_error(e)}") from None
    return path


def ensure_writable_file(path: Path, what: str) -> None:
    """``path`` can be created or replaced later (it is not a directory, its directory is writable)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}: '{path}' is a directory; remove it or choose another output_dir")
    if path.exists():
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise UserError(f"{what}: cannot write '{path}': {describe_os_error(e)}") from None
    ensure_writable_dir(path.parent, what)
