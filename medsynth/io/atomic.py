"""Atomic writes: a file or a whole output folder appears complete or not at all.

Temporaries are hidden (dot-prefixed) siblings of what they become: ``.<file>.<random>.tmp`` for a
file (``.<file>.<random>.tmp.nii.gz`` where the writer needs the format in the name),
``.<folder>.<random>.partial`` for a folder being built and ``.<folder>.<random>.old`` for the
outputs it replaces. A failure in the write removes them; a process killed with ``kill -9`` can leave
them behind, and the next process that holds the folder's :func:`folder_lock` removes them with
:func:`remove_stale_temporaries`. They are created with the mode a plain ``open``/``mkdir`` gives
(``0o666``/``0o777`` less the umask), which the rename carries over to the final file or folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None], *, suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it over ``path``.

    A crash leaves either the old file or the new one, never a torn one; a failure in ``write``, the
    fsync or the rename removes the temporary and leaves the old file as it was.

    Args:
        path: the file to write.
        write: fills the temporary file (it exists and is empty when called).
        suffix: ends the temporary's name, for writers that pick the format from the file name
            (nibabel: ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(path, ".tmp" + suffix, folder=False)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def staged_folder(final: str | Path, *, work: str | Path | None = None, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield a work folder; on success it replaces ``final`` in one rename, on error it is removed.

    Args:
        final: where the complete outputs end up.
        work: the work folder (default: a fresh hidden sibling of ``final``).
        keep_on_error: keep the work folder when the block fails (training keeps its checkpoints
            there so that ``train.resume=true`` can continue).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = _new_sibling(final, ".partial", folder=True) if work is None else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
        # Swap: move the old outputs aside, move the new ones in, then delete the old ones. When the
        # second rename fails, the old outputs go back: ``final`` is never left missing.
        trash = None
        try:
            if final.exists():
                trash = _new_sibling(final, ".old", folder=True)
                os.replace(final, trash / final.name)
            os.replace(work, final)
        except BaseException:
            if trash is not None:
                if (trash / final.name).exists():
                    os.replace(trash / final.name, final)
                shutil.rmtree(trash, ignore_errors=True)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _new_sibling(path: Path, suffix: str, *, folder: bool) -> Path:
    """Create a fresh hidden sibling ``.<name>.<random><suffix>`` of ``path`` (an empty file or folder).

    Not ``tempfile.mkstemp``/``mkdtemp``: they create owner-only files (``0o600``) and folders
    (``0o700``), and the rename would hand that mode on to the outputs. ``os.open``/``os.mkdir`` apply
    the umask, as any plain write does.
    """
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                os.mkdir(candidate, 0o777)
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{path.parent}: no free name for a temporary sibling of {path.name}")


def remove_stale_temporaries(folder: str | Path, *, keep: set[str] = frozenset()) -> list[Path]:
    """Remove what atomic writes of a killed process left in ``folder``: hidden ``*.tmp`` (and
    ``*.tmp.<ext>``) files, ``*.partial`` and ``*.old`` folders (except the names in ``keep``, e.g. a
    training work folder with checkpoints to resume), and hidden temporary files inside the kept folders.

    Call it only while holding :func:`folder_lock` on ``folder``: nobody else is writing there then.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in keep and path.is_dir():
            for tmp in sorted(path.rglob(".*.tmp*")):
                if tmp.is_file() and _TEMPORARY.fullmatch(tmp.name):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        elif path.is_dir() and _STAGED.fullmatch(name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_file() and _TEMPORARY.fullmatch(name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


_STAGED = re.compile(r"\..+\.(partial|old)")
_TEMPORARY = re.compile(r"\..+\.tmp(\.[A-Za-z0-9]+)*")


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, name: str = ".medsynth.lock") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the block; refuse when another process holds it.

    The lock is ``fcntl.flock`` on the hidden file ``name`` inside the folder: the kernel drops it when
    the holder exits in any way, ``kill -9`` included, so a stale lock file never blocks anyone. The
    holder writes its pid there (for the refusal message) and removes the file when the block ends;
    a folder this call created is removed again when it is still empty then.

    Raises:
        MedsynthError: another process holds the lock (named by its pid), or the folder cannot be
            created or written.
    """
    from medsynth.errors import MedsynthError

    folder = Path(folder)
    created = not folder.exists()
    path = folder / name
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MedsynthError(
                f"output folder {folder}: cannot be created or written ({exc.strerror or exc}); expected a writable "
                f"folder (output_dir)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MedsynthError(
                f"output folder {folder} is in use by another medsynth process (pid {holder}); wait for it to finish, "
                f"or give this run another output_dir"
            ) from None
        # The previous holder removes the file before it lets go: when it did so between our open and
        # our lock, we hold a lock on a file nobody else can see. Start again on the file that is there.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: nobody can have taken it in between
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def atomic_save_npy(path: str | Path, array: Any) -> Path:
    """``np.save`` through a temporary file (no pickles: ``allow_pickle=False``)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(array), allow_pickle=False)

    return atomic_write(path, write)
