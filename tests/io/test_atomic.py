"""Tests for medsynth.io.atomic: a failure injected inside an atomic write (a torn write, a failing fsync
or rename, Ctrl-C) leaves the old file byte for byte and no temporary behind."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.io import atomic, nifti
from medsynth.io.atomic import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
    staged_folder,
)
from medsynth.io.state import save_state

# --- helpers -------------------------------------------------------------------------------------

# Each writer writes ``payload`` to ``path``; all of them end in Path.write_bytes or Path.write_text.
WRITERS: dict[str, Callable[[Path, str], Path]] = {
    "atomic_write": lambda path, payload: atomic_write(path, lambda tmp: tmp.write_bytes(payload.encode())),
    "atomic_write_text": atomic_write_text,
    "atomic_write_json": lambda path, payload: atomic_write_json(path, {"payload": payload, "values": [1, 2, 3]}),
    "save_state": lambda path, payload: save_state(path, {"payload": payload, "weights": torch.arange(256.0)}),
}


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def listing(folder: Path) -> list[str]:
    """Every name in ``folder``, hidden ones included."""
    return sorted(os.listdir(folder))


@pytest.fixture
def written(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Callable[[Path, str], Path], Path, bytes]:
    """The writer under test, a file it wrote, and that file's bytes."""
    write = WRITERS[request.param]
    path = write(tmp_path / "target", "old contents " * 50)
    return write, path, path.read_bytes()


class Injected(OSError):
    def __init__(self, what: str) -> None:
        super().__init__(errno.EIO, f"injected failure in {what}")


def torn_writes(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[tuple[Path, int]]:
    """Make Path.write_bytes/write_text write the first half of their data, then raise ``exc`` (a full
    disk, Ctrl-C). Returns the (file, bytes on disk) of each torn write."""
    torn = []

    def write_bytes(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        torn.append((self, self.stat().st_size))
        raise exc

    def write_text(self: Path, data: str, encoding: str | None = None, errors: str | None = None, **_) -> int:
        return write_bytes(self, data.encode(encoding or "utf-8", errors or "strict"))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)
    return torn


def failing(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    """Make ``os.<name>`` (``fsync`` or ``replace``) raise; returns the arguments of each call."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise Injected(name)

    monkeypatch.setattr(atomic.os, name, fail)
    return calls


# --- atomic_write, atomic_write_text, atomic_write_json, save_state --------------------------------


@pytest.mark.parametrize("written", WRITERS, indirect=True)
@pytest.mark.parametrize("exc", [Injected("write"), KeyboardInterrupt()], ids=["disk_full", "ctrl_c"])
def test_torn_write_keeps_the_old_file_and_leaves_no_temporary(written, exc: BaseException, monkeypatch) -> None:
    write, path, old = written
    torn = torn_writes(monkeypatch, exc)
    with pytest.raises(type(exc)):
        write(path, "new contents " * 80)
    monkeypatch.undo()
    # The failure struck inside the write, with bytes of the new contents already on disk.
    [(tmp, size)] = torn
    assert tmp.parent == path.parent and tmp.name != path.name and size > 0
    assert path.read_bytes() == old
    assert listing(path.parent) == [path.name]


@pytest.mark.parametrize("written", WRITERS, indirect=True)
@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_failing_fsync_or_rename_keeps_the_old_file_and_leaves_no_temporary(written, call: str, monkeypatch) -> None:
    write, path, old = written
    calls = failing(monkeypatch, call)
    with pytest.raises(Injected, match=call):
        write(path, "new contents " * 80)
    monkeypatch.undo()
    assert len(calls) == 1  # the fault was reached: the new contents were complete in the temporary then
    if call == "replace":
        assert Path(calls[0][0]).parent == path.parent and Path(calls[0][1]) == path
    assert path.read_bytes() == old
    assert listing(path.parent) == [path.name]


def test_writer_callback_that_fails_midway_through_its_own_handle(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "notes.txt", "old\n")
    seen = []

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"new, half")
            handle.flush()
            seen.append(tmp.read_bytes())
            raise RuntimeError("writer broke")

    with pytest.raises(RuntimeError, match="writer broke"):
        atomic_write(path, write)
    assert seen == [b"new, half"]
    assert path.read_bytes() == b"old\n"
    assert listing(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("name", WRITERS)
def test_failure_without_an_old_file_leaves_nothing(name: str, tmp_path: Path, monkeypatch) -> None:
    failing(monkeypatch, "replace")
    with pytest.raises(Injected):
        WRITERS[name](tmp_path / "target", "contents")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name", WRITERS)
def test_write_replaces_with_the_mode_of_a_plain_write(name: str, tmp_path: Path) -> None:
    """The temporary is not owner-only (``mkstemp``'s 0600): the rename hands its mode to the output."""
    path = WRITERS[name](tmp_path / "target", "old")
    new = WRITERS[name](path, "new contents")
    assert new == path and b"new contents" in path.read_bytes()
    assert listing(tmp_path) == ["target"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()


# --- temporaries that keep the format suffix (NIfTI) -----------------------------------------------


def test_suffix_ends_the_temporary_name(tmp_path: Path) -> None:
    names = []
    atomic_write(
        tmp_path / "image.nii.gz", lambda tmp: names.append(tmp.name) or tmp.write_bytes(b"x"), suffix=".nii.gz"
    )
    [name] = names
    assert name.startswith(".image.nii.gz.") and name.endswith(".tmp.nii.gz")
    assert listing(tmp_path) == ["image.nii.gz"]


def test_write_nifti_failing_midway_keeps_the_old_image_and_leaves_no_temporary(tmp_path: Path, monkeypatch):
    path = nifti.write_nifti(tmp_path / "image.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    old = path.read_bytes()

    def torn_save(image, filename) -> None:
        Path(filename).write_bytes(b"\x1f\x8b half a gzip stream")
        raise Injected("nib.save")

    monkeypatch.setattr(nifti.nib, "save", torn_save)
    with pytest.raises(Injected):
        nifti.write_nifti(path, np.ones((4, 4, 4), np.float32), np.eye(4))
    assert path.read_bytes() == old
    assert listing(tmp_path) == ["image.nii.gz"]


@pytest.mark.parametrize("suffix", ["", ".nii.gz"])
@pytest.mark.parametrize("kept", [False, True], ids=["top", "in_kept_folder"])
def test_temporaries_of_a_killed_writer_are_the_ones_removed(suffix: str, kept: bool, tmp_path: Path) -> None:
    """What a ``kill -9`` inside ``write`` leaves (the temporary, by its real name) is removed by the next
    holder of the folder; the finished files stay."""
    folder = tmp_path / "work" if kept else tmp_path
    names = []

    def killed(tmp: Path) -> None:
        names.append(tmp.name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(folder / "image.nii.gz", killed, suffix=suffix)
    (folder / names[0]).write_bytes(b"left by a killed process")
    atomic_write_text(folder / "done.txt", "complete")
    removed = remove_stale_temporaries(tmp_path, keep={"work"})
    assert removed == [folder / names[0]]
    assert listing(folder) == ["done.txt"]


# --- staged_folder -----------------------------------------------------------------------------------


def stage(folder: Path, text: str) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "result.txt").write_text(text)


def test_staged_folder_failing_block_keeps_the_old_outputs(tmp_path: Path) -> None:
    with staged_folder(tmp_path / "stage") as work:
        stage(work, "old")
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "stage") as work:
        stage(work, "new")
        raise RuntimeError("stage failed")
    assert (tmp_path / "stage" / "sub" / "result.txt").read_text() == "old"
    assert listing(tmp_path) == ["stage"]


def test_staged_folder_failing_swap_puts_the_old_outputs_back(tmp_path: Path, monkeypatch) -> None:
    with staged_folder(tmp_path / "stage") as work:
        stage(work, "old")
    real_replace = os.replace

    def replace(src, dst) -> None:
        if Path(src).name.endswith(".partial"):  # the new outputs moving in
            raise Injected("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(Injected), staged_folder(tmp_path / "stage") as work:
        stage(work, "new")
    monkeypatch.undo()
    assert (tmp_path / "stage" / "sub" / "result.txt").read_text() == "old"
    assert listing(tmp_path) == ["stage"]


def test_staged_folder_has_the_mode_of_a_plain_mkdir(tmp_path: Path) -> None:
    with staged_folder(tmp_path / "stage") as work:
        stage(work, "new")
    assert (tmp_path / "stage").stat().st_mode & 0o777 == 0o777 & ~umask()
    assert listing(tmp_path) == ["stage"]
