"""Writing files so that a reader never sees half of one: the one atomic-write helper of esamp_pl.

A file is written under a temporary name in its own folder, flushed to disk (``fsync``) and moved
onto its final name with ``os.replace``; a folder is filled under a temporary name and renamed when
complete. A crash, a full disk or Ctrl-C therefore leaves either the old file or the new one, never
a torn mix. JSON is written with ``allow_nan=False``: NaN is not JSON, so a non-finite number must
be turned into ``null`` by the caller rather than silently producing a file other tools reject.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where esamp_pl caches (converted models, pair caches, runs): ``$ESAMP_PL_CACHE``, else
    ``$XDG_CACHE_HOME/esamp_pl`` or ``~/.cache/esamp_pl``; never inside the repository."""
    explicit = os.environ.get("ESAMP_PL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "esamp_pl"


def finite_or_none(value: float | None, digits: int | None = None) -> float | None:
    """``value`` (rounded to ``digits``) if it is a finite number, else None: JSON has no NaN."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits) if digits is not None else float(value)


def dumps_json(value: Any, *, indent: int | None = None, sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    """``json.dumps`` that refuses NaN / Infinity (invalid JSON) and keeps non-ASCII text readable."""
    return json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, allow_nan=False)


def _shared_mode(path: Path) -> None:
    """mkstemp makes files private (0600); a written result is meant to be read like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block completes, fsync it and move it onto ``path``.

    The block writes the temporary file by name (e.g. ``safetensors.save_file(tensors, tmp)``). If the
    block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _shared_mode(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, value: Any, *, indent: int | None = 2) -> Path:
    """Replace ``path`` with ``value`` as JSON atomically (NaN refused, see :func:`dumps_json`)."""
    return write_text_atomic(path, dumps_json(value, indent=indent) + "\n")


def write_lines_atomic(path: str | Path, lines: list[str]) -> Path:
    """Replace ``path`` with ``lines`` (each without its newline) atomically."""
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, is_complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; rename it to ``dest`` only if the block completes.

    ``is_complete(folder)`` tells a finished folder (ours, from an earlier run or a concurrent
    process) from a leftover: an existing ``dest`` that is not complete is replaced, a complete one
    that appeared meanwhile is kept. Temporary folders carry the creating process id, so leftovers of
    a killed process are swept on the next attempt.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{dest.name}-"
    for stale in dest.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        yield tmp
        if dest.exists() and not is_complete(dest):
            shutil.rmtree(dest)  # incomplete or foreign: nothing a later run could trust
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):
                raise  # a complete folder that another process renamed into place first is fine
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block, or refuse at once.

    Two processes that would write the same folder (a pre-training run folder) must not interleave;
    the second gets an error naming the holder's pid instead of silently sharing the folder. The
    lock (``flock``) is released by the kernel when the holder exits, even if it is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    from esamp_pl.errors import SetupError

    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise SetupError(f"{what} is in use by another run (pid {holder}; lock {path}). Fix: wait for that run "
                             "to finish (running the same command afterwards resumes or reuses it), or give this "
                             "run its own folder with run_dir=") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on Windows, where probing would kill it, always True)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True
