"""Writes that never leave a half-written file or folder behind, and strict JSON.

The one atomic writer of the package; every file the package writes goes through it:

- ``atomic_write`` (``atomic_write_bytes``, ``atomic_write_text``): one file (text, bytes, anything that
  writes to a binary stream such as a figure), via a temporary file in the same folder, then a rename.
- ``write_json``: strict JSON (RFC 8259: no ``NaN`` or ``Infinity``, which most JSON readers reject),
  non-finite floats written as ``null``, atomically; it returns where it put each ``null``.
- ``atomic_folder``: a whole folder, built in a staging folder beside it and swapped in at once, so that a
  reader never sees an output folder half-updated.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CircuitsError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(stream)`` on a temporary file beside ``path``, then rename it over ``path``.

    An existing file is replaced only once the new one is complete and on disk; on any failure
    (an exception, Ctrl-C) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# --- strict JSON -------------------------------------------------------------------------------------------


def finite_json(data: Any) -> tuple[Any, list[str]]:
    """``data`` with every non-finite float (NaN, +-Infinity) replaced by ``None``, and the key paths replaced.

    Paths read ``evaluation.faithfulness`` or ``curves.eap.curve.faithfulness[3]`` (``""`` for ``data``
    itself). Numpy scalars become Python numbers and tuples lists; ``data`` itself is not changed.
    """
    nulled: list[str] = []

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            if math.isfinite(value):
                return float(value)
            nulled.append(where)
            return None
        if isinstance(value, dict):
            return {key: clean(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value  # json.dumps decides: a TypeError names what it cannot write

    return clean(data, ""), nulled


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> list[str]:
    """Write ``data`` to ``path`` as strict JSON, atomically; returns the key paths written as ``null``.

    Strict: no ``NaN``/``Infinity`` tokens, so that every JSON reader accepts the file. A non-finite
    float is written as ``null`` and its key path (see ``finite_json``) returned, so that the caller can
    say why the value is missing (an empty list when every number was finite). The one JSON writer of
    the package: circuit files, summaries, evaluations and checkpoints go through it.
    """
    finite, nulled = finite_json(data)
    atomic_write_text(path, json.dumps(finite, indent=indent, allow_nan=False) + "\n")
    return nulled


# --- whole folders -----------------------------------------------------------------------------------------


def check_writable_folder(path: str | os.PathLike, what: str = "output folder") -> None:
    """CircuitsError unless a file can be created in ``path`` (or, if it does not exist yet, in its nearest
    existing parent): an output folder that cannot be written fails before the long work, not after it.
    It tries to create a file, since permission bits say nothing for root or on read-only mounts."""
    path = Path(path)
    parent = path
    try:
        if path.exists() and not path.is_dir():
            raise CircuitsError(f"{what} {path} exists and is not a folder")
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise CircuitsError(f"cannot create the {what} {path}: {parent} is not a folder")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".circuits-write-check-"):
            pass
    except OSError as error:
        raise CircuitsError(
            f"cannot write to the {what} {path}: a file cannot be created in {parent} ({error.strerror or error})"
        ) from None


def remove_stale_temporary_files(folder: str | os.PathLike) -> None:
    """Delete the temporary files ``atomic_write`` left in ``folder`` when a process was killed mid-write
    (``.NAME.XXXX.tmp``). Only for folders that one process writes at a time (a run's checkpoint folder)."""
    folder = Path(folder)
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)


def _leftover_pattern(name: str) -> re.Pattern[str]:
    """Names of ``atomic_folder``'s staging and set-aside folders for a target named ``name``: kind, process id."""
    return re.compile(rf"\.{re.escape(name)}\.(staging|old)-(\d+)-\w+")


def _running(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) is alive; this process counts as running."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate the process there: count it as gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _fsync_folder(path: Path) -> None:
    """Make the names in folder ``path`` durable (where the platform allows it)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def recover_folder(path: str | os.PathLike) -> None:
    """Clear up after ``atomic_folder`` runs for ``path`` that were killed outright (kill -9, power loss).

    Their staging folders are deleted. A folder set aside by a run killed between the two renames of its
    swap (``path`` then missing) is renamed back to ``path``; any other set-aside folder is deleted.
    Leftovers of processes still running (writing ``path`` at this moment) are left alone.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = _leftover_pattern(path.name)
    staging, aside = [], []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _running(int(match[2])):
            (staging if match[1] == "staging" else aside).append(entry)
    aside.sort(key=lambda entry: entry.stat().st_mtime)
    if aside and not os.path.lexists(path):
        os.rename(aside.pop(), path)
    for entry in staging + aside:
        shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder at once: ``with atomic_folder(out) as staging:`` write every file into ``staging``.

    ``staging`` is a new empty folder beside ``path`` (``.NAME.staging-PID-RANDOM``, same file system).
    When the block ends without error the staging folder takes ``path``'s place: an existing ``path`` is
    renamed aside (``.NAME.old-PID-RANDOM``), the staging folder renamed to ``path``, and the old folder
    deleted. A reader sees the old complete folder, the new complete folder, or, for the instant between
    the two renames, none; never a mix. ``path`` is replaced as a whole: every file in the old folder is
    gone afterwards, files some other program put there included (callers decide beforehand whether
    ``path`` may be replaced). A symbolic link to a folder is followed: the folder it names is replaced.

    On an exception in the block (Ctrl-C included) the staging folder is deleted and ``path`` left as it
    was. A process killed outright leaves its staging folder (or, in that instant, the old folder set
    aside): ``recover_folder``, run on entry here, clears them up. Two processes writing the same
    ``path`` at once are not supported (one of them may fail at its swap), but neither leaves a mix.

    Raises CircuitsError if ``path`` exists and is not a folder.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise CircuitsError(f"output path {path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-{os.getpid()}-", dir=path.parent))
    aside = None
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder ordinary permissions
        yield staging
        _fsync_folder(staging)
        if os.path.lexists(path):
            aside = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(path, aside)
        try:
            os.rename(staging, path)
        except BaseException:
            if aside is not None:
                os.rename(aside, path)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_folder(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
