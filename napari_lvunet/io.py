"""File I/O shared by the plugin, the CLI and training: atomic writes, one image reader.

Weights, ONNX graphs, CLI masks, training checkpoints and saved correction pairs all go
through :func:`atomic_write`: the bytes go to a temporary file in the target's folder,
are flushed and fsynced, and only then is the file moved under its real name. A crash or
an error at any moment leaves the old file (or none), never half a file, and the
temporary file is always removed.

:func:`read_image` is the one decoder of image files, so that the CLI, the sample data
and the training data see the same pixels for the same file. No Qt, no torch: safe to
import anywhere.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["TIFF_SUFFIXES", "atomic_write", "read_image", "staged_files"]

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    *,
    overwrite: bool,
) -> Path:
    """Write a file through a temporary file in the same folder, then move it into place.

    Args:
        path: Destination file; its folder must exist.
        write: Called once with the temporary file, opened for binary writing; it writes
            the whole content (``write`` may seek, as TIFF and PNG writers do).
        overwrite: Replace an existing ``path`` (atomically, with ``os.replace``). When
            False the file is hard-linked into place, which fails if ``path`` exists, so
            a file created meanwhile by someone else is never replaced either; where the
            filesystem has no hard links, an existence check followed by a rename is the
            fallback.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is False.
        OSError: If the folder is missing or not writable, or the disk is full.
        Exception: Whatever ``write`` raises; nothing is left on disk then.
    """
    path = Path(path)
    tmp, file = _create_temp(path)
    try:
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        _move_into_place(tmp, path, overwrite)
    finally:
        # After os.replace the name is gone; after os.link it is a second name to drop.
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    logger.debug("wrote %s", path)
    return path


@contextmanager
def staged_files(
    paths: Sequence[str | os.PathLike[str]], *, overwrite: bool
) -> Iterator[list[Path]]:
    """Write several files that land together: temporary names first, real names at the end.

    For outputs that belong together (a mask and its overlay, a mask video, its overlay
    video and its per-frame table): the caller writes each file under the temporary name
    yielded for it, by path, with any writer (PyAV, Pillow, ``csv``). When the ``with``
    block ends without an error, every file is fsynced and moved into place as
    :func:`atomic_write` does; when it raises, nothing is moved and the temporary files
    are removed.

    Args:
        paths: Destination files; their folders must exist.
        overwrite: Replace existing destinations. When False and any destination exists,
            none is moved (``FileExistsError``); one created meanwhile by someone else
            makes the files already moved by this call go away again.

    Yields:
        The temporary paths, in the order of ``paths``.

    Raises:
        FileExistsError: If a destination exists and ``overwrite`` is False.
        OSError: If a folder is missing or not writable, or the disk is full.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            tmp, file = _create_temp(target)
            file.close()
            temps.append(tmp)
        yield list(temps)
        if not overwrite:
            for target in targets:
                if target.exists():
                    raise FileExistsError(f"{target} already exists; pass overwrite=True")
        for tmp in temps:
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
        moved: list[Path] = []
        try:
            for tmp, target in zip(temps, targets, strict=True):
                _move_into_place(tmp, target, overwrite)
                moved.append(target)
        except BaseException:
            if not overwrite:  # only files this call linked, never one that was there
                for target in moved:
                    target.unlink(missing_ok=True)
            raise
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    for folder in {t.parent for t in targets}:
        _fsync_dir(folder)


def _create_temp(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file next to ``path``, created exclusively and opened for writing."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # open(..., "xb") creates with mode 0o666 minus the umask, like any file a
            # program makes (tempfile.mkstemp's 0o600 would make outputs private), and
            # gives a file object whose ``name`` is the path, as tifffile expects.
            return tmp, open(tmp, "xb")  # closed by atomic_write
        except FileExistsError:  # a name collision (1 in 4 billion): draw another
            continue


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    message = f"{path} already exists; pass overwrite=True to replace it"
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(message) from None
    except OSError:  # no hard links on this filesystem (some FAT/network mounts)
        if path.exists():
            raise FileExistsError(message) from None
        os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    # Persist the new directory entry too; best effort, as not every platform or
    # filesystem lets a directory be opened or fsynced (Windows does not).
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_image(path: str | os.PathLike[str], *, mask: bool = False) -> np.ndarray:
    """Decode an image file into the array napari would hold.

    TIFFs are read with tifffile, so 16-bit, float and multi-page stacks survive as
    stored. Everything else goes through Pillow: palette images become RGB (RGBA when
    they carry transparency), or their indices when ``mask`` is set (a palette mask's
    indices are its label values); 1-bit and grey+alpha images become grey; CMYK, YCbCr,
    LAB and HSV become RGB.

    A damaged file is refused, never decoded into wrong pixels where the format can tell:
    a PNG's chunk checksums are verified, and a TIFF whose structure tifffile finds
    corrupted (strip counts, offsets, tag lists, page chain) is refused instead of padded
    with zeros or cut short.

    Args:
        path: The file.
        mask: Read a mask (see above).

    Returns:
        The pixel array as decoded: ``(H, W)``, ``(H, W, 3|4)`` or a TIFF's own shape;
        an animated GIF or PNG gives every frame, ``(T, H, W[, 3])``; never empty.

    Raises:
        OSError: If the file is missing or unreadable, or Pillow cannot identify or
            finish it (``PIL.UnidentifiedImageError``, a truncated file).
        ValueError: If the file is damaged or holds no pixels; the message names the file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            array = _read_tiff(path)
        else:
            array = _read_pillow(path, mask=mask)
    except (OSError, ValueError):
        raise
    except Exception as err:  # zlib.error, SyntaxError, struct.error, IndexError, ...
        raise ValueError(f"cannot decode {path}: {type(err).__name__}: {err}") from err
    if array.size == 0:
        raise ValueError(f"{path} holds no pixels (array shape {array.shape})")
    return array


def _read_pillow(path: Path, *, mask: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.format == "PNG":
            # Decoding does not check the pixel chunks' CRCs, so a damaged PNG would give
            # wrong pixels; verify() checks every chunk (and needs a fresh open after).
            img.verify()
    with Image.open(path) as img:
        frames = getattr(img, "n_frames", 1)
        if frames == 1:
            return np.asarray(_decoded(img, mask=mask))
        # An animated GIF or PNG, or a multi-page file: every frame, as a stack, never
        # just the first. Frames are made alike (a GIF's later frames may change mode).
        stack = []
        for index in range(frames):
            img.seek(index)
            frame = _decoded(img, mask=mask)
            if not mask and frame.mode != "L":
                frame = frame.convert("RGB")
            stack.append(np.asarray(frame))
        if len({frame.shape for frame in stack}) != 1:
            raise ValueError(f"{path}: its {frames} frames differ in size; cannot stack them")
        return np.stack(stack)


def _decoded(img: Any, *, mask: bool) -> Any:
    """One Pillow frame in the mode napari shows it in (see :func:`read_image`)."""
    if img.mode in ("P", "PA") and mask:
        return img.getchannel(0)
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    if img.mode in ("1", "LA"):
        return img.convert("L")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    return img


class _ThreadErrors(logging.Handler):
    """Collects the ERROR records the calling thread logs (batch reads run in threads)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    # tifffile logs corrupted structure as an ERROR and carries on: a wrong strip count is
    # padded with zeros (one flipped byte made a 5 x 256 x 320 stack 2.6 million rows of
    # zeros), a broken page chain cuts a stack short. Both are refused here.
    errors = _ThreadErrors()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(errors)
    try:
        with tifffile.TiffFile(path) as tif:
            tif.series  # noqa: B018 - parses every page, logging any corruption
            if not errors.messages:
                array = np.asarray(tif.asarray())
    finally:
        tiff_logger.removeHandler(errors)
    if errors.messages:
        raise ValueError(f"{path} is a damaged TIFF: {errors.messages[0]}")
    return array
