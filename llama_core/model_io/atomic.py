"""Atomic outputs: a writer fills a temporary sibling, which replaces the target by renames.

Used by ``save_pretrained`` and by every conversion in checkpoints_convert, so a crash or an error leaves
either the old directory (or file) or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; on success it replaces ``target`` by renames,
    so readers see the old directory or the new one, never a mix. Entries of an existing ``target`` for
    which ``keep(name)`` is true are carried over (hard links where possible). On error nothing changes."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not target.is_dir():
                raise NotADirectoryError(f"{target} exists and is not a directory")
            for item in target.iterdir():
                if keep is not None and keep(item.name) and not (tmp / item.name).exists():
                    _link_or_copy(item, tmp / item.name)
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path of the file ``target`` to write; on success it replaces ``target`` in
    one rename (after an fsync), on error it is removed and ``target`` is untouched."""
    target = Path(target).expanduser().absolute()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
