"""Atomic outputs: a writer fills a temporary sibling, which replaces the target by renames.

Used by ``save_pretrained`` and by every conversion in checkpoints_convert, so a crash or an error leaves
either the old directory (or file) or the new one, never a mix.

Three more guarantees, because outputs are big and users run things in parallel and kill them:

- Writers of one target serialise: each holds an exclusive ``flock`` on ``.<name>.lc-lock`` beside the
  target for the whole write (a second writer waits, then carries over what the first one left). The
  holder deletes the lock file on release; a waiter checks it locked the file still at that path.
- Temporaries are named ``.<name>.lc-tmp.<pid>.<random>`` (``lc-old`` for a replaced directory being
  deleted); the next writer of the target, holding the lock, removes those whose process is dead, so a
  ``kill -9`` mid-write costs disk space only until the next save.
- A full disk is reported as ``no space left on device while writing <path>`` (an OSError with errno
  ENOSPC, see ``NoSpaceLeftError``), whatever layer hit it, and the temporary is removed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_MARK = "lc"  # in every name we create, so cleanup never touches a file some other tool named alike


class NoSpaceLeftError(OSError):
    """ENOSPC with the path being written (the OS error, or torch's "unexpected pos", names no file)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}")
        self.path = str(path)


@contextmanager
def atomic_directory(target: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; on success it replaces ``target`` by renames,
    so readers see the old directory or the new one, never a mix. Entries of an existing ``target`` for
    which ``keep(name)`` is true are carried over (hard links where possible). On error nothing changes."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        tmp = temp_path(target)
        try:
            tmp.mkdir()
            yield tmp
            if target.exists() and not target.is_dir():
                raise NotADirectoryError(f"{target} exists and is not a directory")
            if target.exists():
                for item in target.iterdir():
                    if keep is not None and keep(item.name) and not (tmp / item.name).exists():
                        _link_or_copy(item, tmp / item.name)
            replace_directory(tmp, target)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_no_space(e, tmp, target)
            raise


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path of the file ``target`` to write; on success it replaces ``target`` in
    one rename (after an fsync), on error it is removed and ``target`` is untouched."""
    target = Path(target).expanduser().absolute()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        tmp = temp_path(target)
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            raise_if_no_space(e, tmp, target)
            raise


# ---- locking and stale temporaries ------------------------------------------------------------------------

def temp_path(target: Path, kind: str = "tmp") -> Path:
    """A fresh sibling name that records its owner's pid, so a later writer can tell it is orphaned."""
    return target.parent / f".{target.name}.{_MARK}-{kind}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{_MARK}-lock"


@contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``target`` (waiting for another writer), after clearing dead writers'
    temporaries. The kernel drops a flock when its holder dies, so a killed writer never blocks the next."""

    def wait(fd: int, holder: str) -> None:
        logger.warning("%s is being written by another process (pid %s); waiting for it", target, holder)
        fcntl.flock(fd, fcntl.LOCK_EX)

    with _held(lock_path(target), wait):
        remove_stale_temporaries(target)
        yield


class BusyError(OSError):
    """Another live process holds the lock of what we were about to write."""


@contextmanager
def exclusive_directory(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``directory``'s lock for the whole block, for a long-running writer such as a training run (its
    checkpoints, metrics and export): a second one fails at once with :class:`BusyError` naming the holder's
    pid, rather than waiting hours or interleaving its files. The kernel drops the lock when its holder dies,
    so a killed run never blocks the next."""
    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)

    def refuse(fd: int, holder: str) -> None:
        os.close(fd)
        raise BusyError(errno.EBUSY, f"{directory} is in use by another {what} (pid {holder}); wait for it to "
                        "finish or choose another directory")

    with _held(directory / f".{_MARK}-run-lock", refuse):
        yield


@contextmanager
def _held(path: Path, on_busy: Callable[[int, str], None]) -> Iterator[None]:
    """An exclusive flock on the file ``path`` for the block; when another process holds it, ``on_busy(fd,
    holder_pid)`` waits for it (returns once locked) or raises. The file records the holder's pid (for those
    messages) and is removed on release while still held, so no lock file is left behind; a waiter on the
    removed inode notices and retries on a fresh file."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_busy(fd, os.pread(fd, 32, 0).decode(errors="replace").strip() or "?")
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the previous holder removed this lock file on release: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` whose writer process is gone; call with the lock held.

    A crash of the two-rename fallback between its renames leaves no target but an ``lc-old`` copy of the
    previous one: that copy is put back rather than deleted."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{_MARK}-(tmp|old)\.(\d+)\.[0-9a-f]{{8}}$")
    removed = []
    for entry in sorted(target.parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(target):
            os.rename(entry, target)
            logger.warning("restored %s from %s, left by a writer that died while replacing it", target, entry)
            continue
        logger.warning("removing %s, left by a writer (pid %s) that no longer runs", entry, m.group(2))
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# ---- replacing a directory --------------------------------------------------------------------------------

def replace_directory(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; an existing ``target`` is replaced and then deleted.

    Linux swaps the two in one step (renameat2 RENAME_EXCHANGE), so ``target`` exists at every instant;
    elsewhere two renames leave a moment without it, which ``remove_stale_temporaries`` repairs."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old content, still under a temp name
        return
    old = temp_path(target, "old")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the C library or the file system cannot."""
    rename = getattr(_libc(), "renameat2", None)
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# ---- a full disk ------------------------------------------------------------------------------------------

def find_no_space(exc: BaseException) -> OSError | None:
    """The ENOSPC OSError behind ``exc``, if any: directly, as its cause or context (torch.save turns a
    failed write into "unexpected pos" with the OSError as context), or inside torch.distributed.checkpoint's
    per-rank failures."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


@contextmanager
def no_space_names(path: str | os.PathLike) -> Iterator[None]:
    """Around the writing of one file: a full disk becomes NoSpaceLeftError naming it."""
    try:
        yield
    except BaseException as e:
        if find_no_space(e) is None or isinstance(e, NoSpaceLeftError):
            raise
        raise NoSpaceLeftError(path) from e


def raise_if_no_space(exc: BaseException, tmp: Path, target: Path) -> None:
    """Re-raise a full disk hit while writing ``tmp`` as NoSpaceLeftError naming the place in ``target``."""
    found = find_no_space(exc)
    if found is None:
        return
    where = getattr(found, "path", None) or found.filename
    shown = target
    if where is not None:
        try:
            rel = Path(os.fsdecode(where)).absolute().relative_to(tmp)
            shown = target / rel if rel.parts else target
        except ValueError:
            shown = Path(os.fsdecode(where))
    raise NoSpaceLeftError(shown) from exc


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src, dst) -> None:
    try:
        os.link(src, dst)  # instant and no extra space; the old directory is deleted afterwards
    except OSError:
        shutil.copy2(src, dst)
