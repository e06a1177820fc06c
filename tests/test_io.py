"""The one atomic-write helper: refusal, replacement, clean-up, permissions."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_lvunet.io import atomic_write, read_image


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_new_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    assert atomic_write(target, lambda f: f.write(b"abc"), overwrite=False) == target
    assert target.read_bytes() == b"abc"
    assert _names(tmp_path) == ["out.bin"]


def test_refuses_to_overwrite_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_write(target, lambda f: f.write(b"new"), overwrite=False)
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


def test_replaces_with_overwrite(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic_write(target, lambda f: f.write(b"new"), overwrite=True)
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_failing_write_leaves_nothing_and_keeps_the_old_file(tmp_path, overwrite):
    old = tmp_path / "old.bin"
    old.write_bytes(b"old")

    def write(f):
        f.write(b"half a file")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(tmp_path / "new.bin", write, overwrite=overwrite)
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(old, write, overwrite=overwrite)
    assert _names(tmp_path) == ["old.bin"]
    assert old.read_bytes() == b"old"


def test_write_may_seek(tmp_path):
    def write(f):
        f.write(b"xxxx")
        f.seek(0)
        f.write(b"ab")

    atomic_write(tmp_path / "a.bin", write, overwrite=False)
    assert (tmp_path / "a.bin").read_bytes() == b"abxx"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_new_files_get_normal_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"a"), overwrite=False)
        atomic_write(tmp_path / "b.bin", lambda f: f.write(b"b"), overwrite=True)
    finally:
        os.umask(previous)
    for name in ("a.bin", "b.bin"):
        # 0o666 & ~umask, as any program's new file, not mkstemp's private 0o600.
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_missing_folder_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "a.bin", lambda f: f.write(b"a"), overwrite=False)


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_animated_images_give_every_frame_not_just_the_first(tmp_path: Path, suffix: str) -> None:
    """An animated GIF (or APNG) once gave frame 0 only, silently."""
    frames = [np.full((20, 30, 3), value, np.uint8) for value in (0, 120, 250)]
    frames[1][5:15, 5:15] = (255, 0, 0)
    path = tmp_path / f"clip{suffix}"
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    stack = read_image(path)
    assert stack.shape == (3, 20, 30, 3)
    assert [int(frame.mean()) for frame in stack] == [int(f.mean()) for f in frames]
