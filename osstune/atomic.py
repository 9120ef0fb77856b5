"""Durable, atomic writes: the one way osstune publishes a file or a directory.

A file or directory is written under a hidden temporary name beside its target, flushed to disk
(fsync of every file, then of the directory), and renamed into place, so a reader (or the next run
after a crash) sees either the old complete version or the new complete one. A directory that
replaces an existing one is published by renaming the old one aside first, then the new one in,
then deleting the old: a crash at any moment leaves at least one complete copy.

Temporaries are named `.NAME.partial-PID-HOST-TAG`. A process killed with SIGKILL cannot remove its
own; `clean_leftovers` (called by every writer on the directory it writes in, before it writes)
removes those whose process is no longer alive on this host, so they never accumulate. No torch here: this is the bottom layer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_MARK = ".partial-"
# An existing directory moved aside while its replacement is renamed in.
_ASIDE = ".aside-"


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(target: Path, mark: str = _MARK) -> Path:
    """A hidden temporary path beside `target` that names this process and host."""
    return target.parent / f".{target.name}{mark}{os.getpid()}-{_host()}-{uuid.uuid4().hex[:8]}"


def _dead_owner(p: Path, mark: str) -> bool:
    """Whether `p` is a temporary (of kind `mark`) whose process died on this host."""
    if mark not in p.name:
        return False
    try:
        pid_s, host, _tag = p.name.rsplit(mark, 1)[1].split("-")
        pid = int(pid_s)
    except ValueError:
        return False  # not one of ours
    return host == _host() and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def clean_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Remove temporaries in `parent` (of target `name`, or of any target) left by processes of this
    host that died. A temporary of a live process, or of another host sharing the directory, is kept.
    A directory that a dead process had moved aside to replace it, and whose replacement never
    arrived, is moved back."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    prefix = f".{name}." if name is not None else "."
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(prefix):
            continue
        if _dead_owner(p, _ASIDE):
            original = parent / p.name[1:].rsplit(_ASIDE, 1)[0]
            if not original.exists():
                os.replace(p, original)
                continue
            _remove(p)
            removed.append(p)
        elif _dead_owner(p, _MARK):
            _remove(p)
            removed.append(p)
    return removed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(target: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path to write `target`'s content to; on success it is fsynced and renamed
    over `target`; on an exception it is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    tmp = temp_name(target)
    try:
        yield tmp
        os.chmod(tmp, mode)  # shared caches and checkpoints are readable by the group, as plain files are
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)


def write_with(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp_path)` then publish it as `target` (e.g. safetensors' save_file)."""
    with atomic_file(target) as tmp:
        write(tmp)


@contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success every file in it is fsynced and it is
    renamed to `target`. An existing `target` is replaced only with `replace=True` (else
    FileExistsError): moved aside, the new one renamed in, then the old one deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    tmp = temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = temp_name(target, _ASIDE)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
                old = None
            raise
        fsync_dir(target.parent)
    except BaseException:
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)
