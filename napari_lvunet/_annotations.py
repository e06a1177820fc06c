"""The widget's logic that needs no Qt: axes, slice bookkeeping, saving corrections.

Everything here works on numpy arrays and paths, so it is tested without a display; the
dock widget (``_widget.py``) only gathers the user's choices and calls these functions.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import logging
import re
import shlex
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from .io import atomic_write, read_image
from .preprocess import to_unit_rgb

__all__ = [
    "PAIR_SUFFIXES",
    "PROVENANCE_KEYS",
    "RESULT_COLOURS",
    "DuplicateImageError",
    "PartialSaveError",
    "SaveResult",
    "SavedPair",
    "SliceIndex",
    "correction_record",
    "edited_slices",
    "file_digest",
    "finetune_command",
    "image_digest",
    "iter_slices",
    "layer_axes",
    "next_colour",
    "safe_stem",
    "save_for_training",
    "slice_digest",
    "slice_stem",
]

logger = logging.getLogger(__name__)

#: Position of one 2D slice in a stack: its indices along the leading (non-YX) axes;
#: ``()`` for a plain 2D image.
SliceIndex = tuple[int, ...]

_LEADING_AXES = "TZ"

#: Colours of successive results, chosen to stand out on red and pink mucosa (no reds,
#: no pinks) and from each other: the first result is cyan, the next yellow, and so on.
RESULT_COLOURS = ("#00ffff", "#ffff00", "#00ff00", "#4da6ff", "#ffffff", "#ff8c00")


def next_colour(used: Iterable[str]) -> str:
    """The first result colour no other open result uses (cycling when all are taken)."""
    taken = [c.lower() for c in used]
    for colour in RESULT_COLOURS:
        if colour not in taken:
            return colour
    return RESULT_COLOURS[len(taken) % len(RESULT_COLOURS)]


def slice_digest(labels2d: np.ndarray) -> bytes:
    """A digest of one labels slice's values: tells a correction from the model's result.

    Only foreground matters for training (``save_for_training`` writes ``labels > 0``),
    so a relabelled instance is not a change, a painted or erased pixel is.
    """
    mask = np.packbits(np.asarray(labels2d) > 0)
    return hashlib.blake2b(mask.tobytes(), digest_size=16).digest()


def layer_axes(ndim: int, rgb: bool) -> str:
    """Napari-style axis letters for an image layer's data.

    Args:
        ndim: The layer's number of spatial dimensions (napari's ``layer.ndim``, which does
            not count the colour channel of an RGB layer): 2, 3 or 4.
        rgb: Whether the last data axis holds colour channels.

    Returns:
        e.g. ``"YX"``, ``"YXC"``, ``"ZYX"``, ``"ZYXC"``, ``"TZYX"``.

    Raises:
        ValueError: For fewer than 2 or more than 4 spatial dimensions.
    """
    if not 2 <= ndim <= 4:
        raise ValueError(
            f"unsupported image with {ndim} spatial dimensions: LV-UNet segments 2D images "
            "and stacks of them (2 to 4 dimensions, e.g. YX, ZYX, TZYX)"
        )
    return _LEADING_AXES[2 - (ndim - 2) :] + "YX" + ("C" if rgb else "")


def iter_slices(leading_shape: Sequence[int]) -> Iterable[SliceIndex]:
    """All slice indices of a stack with the given leading shape, in C order."""
    return (tuple(int(i) for i in idx) for idx in np.ndindex(*leading_shape))


def edited_slices(history_item: Iterable[Any], n_leading: int) -> set[SliceIndex]:
    """The slices touched by one napari Labels edit (brush, eraser, fill, polygon).

    napari's ``Labels.events.paint`` carries the undo-history item of the edit: a list of
    atoms, each either a masked atom with a ``slice_key`` (a bounding box of slices) or an
    ``(indices, old_values, new_values)`` tuple of fancy indices.

    Args:
        history_item: The ``value`` of a ``Labels.events.paint`` event.
        n_leading: Number of leading (stack) axes of the labels data; 0 for 2D.

    Returns:
        The set of edited slice indices (``{()}`` for any edit of a 2D layer).
    """
    touched: set[SliceIndex] = set()
    for atom in history_item:
        slice_key = getattr(atom, "slice_key", None)
        if slice_key is not None:
            ranges = [range(s.start or 0, s.stop) for s in slice_key[:n_leading]]
            touched.update(itertools.product(*ranges))
        else:
            indices = atom[0]
            if n_leading == 0:
                touched.add(())
                continue
            lead = np.stack([np.asarray(ix).ravel() for ix in indices[:n_leading]], axis=1)
            touched.update(tuple(int(v) for v in row) for row in np.unique(lead, axis=0))
    return touched


def safe_stem(name: str) -> str:
    """A file-name stem from a layer name: letters, digits, ``-`` and ``_`` only."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return stem or "image"


def slice_stem(stem: str, index: SliceIndex) -> str:
    """The stem of one slice's pair, e.g. ``scan_z003`` or ``movie_t001_z003``."""
    axes = _LEADING_AXES[len(_LEADING_AXES) - len(index) :]
    return stem + "".join(f"_{ax.lower()}{i:03d}" for ax, i in zip(axes, index, strict=True))


def finetune_command(data_dir: str | Path, weights: str | Path) -> str:
    """The shell command that fine-tunes ``weights`` on a saved corrections folder."""
    return (
        f"python -m training.finetune --data {shlex.quote(str(data_dir))} "
        f"--weights {shlex.quote(str(weights))}"
    )


def _to_png_array(image2d: np.ndarray) -> np.ndarray:
    """The pixels of one slice as a uint8 PNG array the training loader reads back.

    uint8 data is written unchanged (alpha dropped), so a training image is bit-identical
    to what was segmented; other dtypes go through the shared preprocessing's scaling.
    """
    if image2d.dtype == np.uint8:
        return image2d[..., :3] if image2d.ndim == 3 else image2d
    unit = to_unit_rgb(image2d)
    if image2d.ndim == 2 or image2d.shape[-1] == 1:
        unit = unit[..., 0]
    return np.round(unit * 255.0).astype(np.uint8)


# ---------------------------------------------------------------- saving corrections

#: The file types of a pair's image and mask that training reads. This repeats
#: ``training.data.IMAGE_SUFFIXES`` (that module imports torch); a test keeps them equal.
PAIR_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

#: Folders of a dataset beside ``images/`` and ``masks/``; training reads none of them.
PROPOSALS_DIR = "proposals"  # the model's proposal of each saved pair (0/255 PNG)
RECORDS_DIR = "records"  # one JSON correction record per saved pair
HISTORY_DIR = "history"  # what an update replaced: history/<UTC time>/{masks,records,proposals}

#: The dataset's image digests (hidden: training reads ``images/`` and ``masks/`` only).
DIGESTS_FILE = ".napari-lvunet-digests.json"
_DIGESTS_FILE_MAX = 64 * 1024**2

RECORD_FORMAT = "napari-lvunet-correction"
RECORD_FORMAT_VERSION = 1

#: The keys of ``save_for_training``'s ``provenance`` that go into a record.
PROVENANCE_KEYS = ("weights_name", "weights_sha256", "threshold", "sizing", "output")

DUPLICATE_CHOICES = ("refuse", "update")


def image_digest(array: np.ndarray) -> str:
    """SHA-256 of an image's pixels: its shape, dtype and values.

    The same picture saved twice, under two names or in two lossless formats, has one
    digest. :func:`file_digest` (the saved files) and ``training.adapt.content_digest``
    (the held-out split) are this digest of the decoded file.
    """
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())
    h.update(array.tobytes())
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 100_000


def file_digest(path: str | Path) -> str:
    """:func:`image_digest` of an image file's decoded pixels (``io.read_image``).

    Remembered per file (path, inode, size, modification and status-change times), so
    saving into a large dataset decodes each of its images once per session.

    Raises:
        OSError, ValueError: If the file cannot be read or decoded.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known is not None:
        return known
    digest = image_digest(read_image(path))
    with _DIGESTS_LOCK:
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


class DuplicateImageError(ValueError):
    """An image to save is in the dataset already, with another mask.

    Attributes:
        duplicates: ``(slice index, existing image, its mask or None)`` per clash.
    """

    def __init__(self, message: str, duplicates: Sequence[tuple[SliceIndex, Path, Path | None]]):
        super().__init__(message)
        self.duplicates = tuple(duplicates)


@dataclass(frozen=True)
class SavedPair:
    """What happened to one image of a save.

    Attributes:
        slices: The saved slices showing this image (several when a stack holds the same
            frame twice: one pair for all of them).
        image, mask: The pair in the dataset.
        status: ``"written"`` (a new pair), ``"updated"`` (an existing pair of the same
            image got the new mask; the previous one is in ``history``) or
            ``"unchanged"`` (the same image with the same mask was saved already).
        record, proposal: The correction record and the model's proposal written with it
            (None when nothing was written, or no proposal was known).
        history: The folder that keeps what an update replaced.
    """

    slices: tuple[SliceIndex, ...]
    image: Path
    mask: Path
    status: str
    record: Path | None = None
    proposal: Path | None = None
    history: Path | None = None


@dataclass(frozen=True)
class SaveResult(Sequence[tuple[Path, Path]]):
    """The outcome of :func:`save_for_training`: a sequence of ``(image, mask)`` pairs
    (every pair that now holds a saved slice), with what happened to each in ``items``."""

    items: tuple[SavedPair, ...]

    def __getitem__(self, i):  # type: ignore[override]
        pairs = [(item.image, item.mask) for item in self.items]
        return pairs[i]

    def __len__(self) -> int:
        return len(self.items)

    def _with(self, status: str) -> list[SavedPair]:
        return [item for item in self.items if item.status == status]

    @property
    def written(self) -> list[SavedPair]:
        """New pairs."""
        return self._with("written")

    @property
    def updated(self) -> list[SavedPair]:
        """Existing pairs of the same image that got the new mask."""
        return self._with("updated")

    @property
    def unchanged(self) -> list[SavedPair]:
        """Pairs saved before with the same image and mask: nothing written."""
        return self._with("unchanged")

    def summary(self) -> str:
        """One line for a status bar, e.g. ``2 pairs written, 1 updated (...)``."""
        parts = []
        if self.written:
            parts.append(f"{len(self.written)} new pair(s) written")
        if self.updated:
            names = ", ".join(item.image.name for item in self.updated[:3])
            more = ", ..." if len(self.updated) > 3 else ""
            parts.append(
                f"{len(self.updated)} existing pair(s) updated ({names}{more}; the previous "
                f"masks are kept in {HISTORY_DIR}/)"
            )
        if self.unchanged:
            parts.append(f"{len(self.unchanged)} unchanged (already saved with this mask)")
        return "; ".join(parts) or "nothing saved"


def _slice_label(index: SliceIndex) -> str:
    """``slice z001`` (``slice t002_z001``) in a stack, ``the image`` for a 2D image."""
    return "slice " + slice_stem("", index)[1:] if index else "the image"


def _same_name_files(folder: Path, name: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.glob(f"{glob.escape(name)}.*")
        if p.suffix.lower() in PAIR_SUFFIXES and p.stem == name
    )


class _DigestIndex:
    """The digests of a dataset's images, kept in :data:`DIGESTS_FILE` beside them.

    ``{file name: [size, mtime_ns, inode, ctime_ns, digest]}``: an entry whose file
    changed any of these since, or that is malformed, is recomputed; a damaged index is
    ignored (and rewritten). Without it, a new session would decode every image of a
    large dataset on its first save. The inode and status-change time catch a file
    replaced by another of the same size whose modification time was restored (``cp -p``,
    ``rsync -a``, unpacking an archive): ``os.utime`` cannot set the status-change time.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / DIGESTS_FILE
        self.known = self._load()
        self.changed = False

    def _load(self) -> dict[str, list[Any]]:
        try:
            if self.path.stat().st_size > _DIGESTS_FILE_MAX:
                return {}
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            name: entry
            for name, entry in data.items()
            if isinstance(entry, list)
            and len(entry) == 5
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[:4])
            and isinstance(entry[4], str)
            and re.fullmatch(r"[0-9a-f]{64}", entry[4])
        }

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

    def digest(self, path: Path) -> str:
        stamp = self._stamp(path)
        entry = self.known.get(path.name)
        if entry is not None and entry[:4] == stamp:
            return str(entry[4])
        digest = file_digest(path)
        self.known[path.name] = [*stamp, digest]
        self.changed = True
        return digest

    def add(self, path: Path, digest: str) -> None:
        """Record the digest of an image just written (no need to decode it again)."""
        self.known[path.name] = [*self._stamp(path), digest]
        self.changed = True

    def save(self, present: Iterable[str]) -> None:
        """Write the index of the images ``present`` (best effort: it is only a cache)."""
        names = set(present)
        kept = {name: entry for name, entry in sorted(self.known.items()) if name in names}
        if not self.changed and kept == self.known:
            return
        try:
            atomic_write(self.path, _json_writer(kept), overwrite=True)
        except OSError as err:
            logger.warning("cannot keep the image digests in %s: %s", self.path, err)


def _image_names(images_dir: Path) -> list[str]:
    """The names of the dataset's images (what the digest index keeps)."""
    if not images_dir.is_dir():
        return []
    return [p.name for p in images_dir.iterdir() if p.suffix.lower() in PAIR_SUFFIXES]


def _saved_images(images_dir: Path, index: _DigestIndex) -> dict[str, list[Path]]:
    """The dataset's images by :func:`file_digest`; unreadable files are skipped (logged)."""
    found: dict[str, list[Path]] = {}
    if not images_dir.is_dir():
        return found
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in PAIR_SUFFIXES:
            continue
        if not path.is_file():
            continue
        try:
            digest = index.digest(path)
        except (OSError, ValueError) as err:
            logger.warning("cannot compare with %s (%s); it is left as it is", path, err)
            continue
        found.setdefault(digest, []).append(path)
    return found


def _mask_equals(mask_path: Path | None, mask: np.ndarray) -> bool:
    if mask_path is None:
        return False
    try:
        saved = read_image(mask_path, mask=True)
    except (OSError, ValueError):
        return False
    if saved.ndim == 3:
        saved = saved.max(axis=-1)
    return saved.shape == mask.shape and bool(np.array_equal(saved > 0, mask))


def _free_stem(root: Path, stem: str, slice_ids: Sequence[SliceIndex]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... : the first that no file of any pair (image,
    mask, proposal or record) uses yet."""
    folders = [root / d for d in ("images", "masks", PROPOSALS_DIR, RECORDS_DIR)]

    def taken(candidate: str) -> bool:
        for index in slice_ids:
            name = slice_stem(candidate, index)
            for folder in folders:
                if folder.is_dir() and any(folder.glob(f"{glob.escape(name)}.*")):
                    return True
        return False

    candidate, n = stem, 1
    while taken(candidate):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _png_writer(array: np.ndarray) -> Callable[[BinaryIO], None]:
    return lambda fh: Image.fromarray(array).save(fh, format="PNG")


def _mask_writer(mask: np.ndarray) -> Callable[[BinaryIO], None]:
    return _png_writer(mask.astype(np.uint8) * 255)


def _json_writer(record: Mapping[str, Any]) -> Callable[[BinaryIO], None]:
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    return lambda fh: fh.write(text.encode("utf-8"))


def _dice(proposal: np.ndarray, corrected: np.ndarray) -> float:
    total = int(proposal.sum()) + int(corrected.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(proposal, corrected).sum()) / total


def _json_value(value: Any) -> Any:
    """A provenance value as JSON: numbers, strings, booleans and None as they are."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return str(value)


def correction_record(
    *,
    image: str,
    mask: str,
    slice_index: SliceIndex,
    digest: str,
    corrected: np.ndarray,
    proposal: np.ndarray | None,
    provenance: Mapping[str, Any] | None,
    proposal_file: str | None = None,
    previous: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """The JSON record of one saved pair: where it came from and how much was corrected.

    Args:
        image, mask, proposal_file: The pair's files, relative to the dataset folder.
        slice_index: The slice of the stack the pair was saved from (``()`` for 2D).
        digest: :func:`image_digest` of the saved image.
        corrected: The saved mask (bool, HxW).
        proposal: The model's foreground for this slice (bool, HxW), or None when not
            known: then the effort fields are None, never guessed.
        provenance: ``weights_name``, ``weights_sha256``, ``threshold``, ``sizing``,
            ``output`` of the model run that made the proposal (missing keys: None).
        previous: The history folder that keeps what this record's save replaced.
        time: ISO 8601 UTC time; now when None.
    """
    corrected = np.asarray(corrected, dtype=bool)
    prov = dict(provenance or {})
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "time": time or datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "image": image,
        "mask": mask,
        "proposal": proposal_file,
        "slice": [int(i) for i in slice_index],
        **{key: _json_value(prov.get(key)) for key in PROVENANCE_KEYS},
        "pixels": int(corrected.size),
        "foreground": int(corrected.sum()),
        "pixels_added": None,
        "pixels_removed": None,
        "dice": None,
        "image_digest": digest,
        "previous": previous,
    }
    if proposal is not None:
        proposal = np.asarray(proposal, dtype=bool)
        record["pixels_added"] = int(np.logical_and(corrected, ~proposal).sum())
        record["pixels_removed"] = int(np.logical_and(proposal, ~corrected).sum())
        record["dice"] = _dice(proposal, corrected)
    return record


@dataclass
class _Planned:
    """One distinct image of a save, before anything is written."""

    slices: list[SliceIndex]
    pixels: np.ndarray
    mask: np.ndarray
    digest: str
    proposal: np.ndarray | None
    existing: list[tuple[Path, Path | None, bool]]  # (image, mask, same mask)
    source: SliceIndex  # the slice whose proposal and model run the record describes


def _plan(
    image: np.ndarray,
    labels: np.ndarray,
    slice_ids: Sequence[SliceIndex],
    proposals: Mapping[SliceIndex, np.ndarray],
) -> list[_Planned]:
    """What each slice would write, slices showing the same image merged into one."""
    plans: dict[str, _Planned] = {}
    for index in slice_ids:
        pixels = _to_png_array(np.asarray(image[index]))
        mask = np.asarray(labels[index]) > 0
        digest = image_digest(pixels)
        proposal = proposals.get(index)
        first = plans.get(digest)
        if first is None:
            plans[digest] = _Planned([index], pixels, mask, digest, proposal, [], index)
            continue
        if not np.array_equal(first.mask, mask):
            raise ValueError(
                f"{_slice_label(first.slices[0])} and {_slice_label(index)} show the same "
                "image with different masks: save one of them"
            )
        first.slices.append(index)
        if first.proposal is None and proposal is not None:
            first.proposal, first.source = proposal, index
    return list(plans.values())


def _check_proposals(
    proposals: Mapping[SliceIndex, Any] | None, labels: np.ndarray, slice_ids: list[SliceIndex]
) -> dict[SliceIndex, np.ndarray]:
    checked: dict[SliceIndex, np.ndarray] = {}
    for index, proposal in (proposals or {}).items():
        index = tuple(int(i) for i in index)
        if index not in slice_ids or proposal is None:
            continue
        array = np.asarray(proposal)
        if array.shape != labels.shape[len(index) :]:
            raise ValueError(
                f"the proposal of {_slice_label(index)} has shape {array.shape}, the labels "
                f"{labels.shape[len(index) :]}"
            )
        checked[index] = array > 0
    return checked


class PartialSaveError(OSError):
    """A save failed part-way and could not undo all it had written.

    Attributes:
        left: The files left as that save wrote (or removed) them.
    """

    def __init__(self, message: str, left: Sequence[Path]):
        super().__init__(message)
        self.left = tuple(left)


class _Journal:
    """What one save changed in the dataset, so that a failure part-way undoes all of it.

    Each write or removal is noted with the copy that restores the file (its copy in the
    save's history folder), or None for a file that did not exist before; folders the
    save made are removed again when empty.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[Path, Path | None]] = []
        self._dirs: list[Path] = []

    def mkdir(self, path: Path) -> None:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self._dirs.extend(reversed(missing))  # outermost first

    def history(self, root: Path, stamp: str) -> Path:
        """A new folder ``history/<stamp>[-n]`` for what this save replaces."""
        base = root / HISTORY_DIR
        self.mkdir(base)
        candidate, n = base / stamp, 1
        while True:
            try:
                candidate.mkdir()
            except FileExistsError:
                n += 1
                candidate = base / f"{stamp}-{n}"
                continue
            self._dirs.append(candidate)
            return candidate

    def write(
        self,
        path: Path,
        writer: Callable[[BinaryIO], None],
        *,
        overwrite: bool = False,
        backup: Path | None = None,
    ) -> None:
        atomic_write(path, writer, overwrite=overwrite)
        self._steps.append((path, backup))

    def keep(self, path: Path, history: Path) -> Path:
        """Copy ``path`` into ``history/<its folder name>/`` (never replacing a file there)."""
        target = history / path.parent.name
        self.mkdir(target)
        data = path.read_bytes()
        self.write(target / path.name, lambda fh: fh.write(data))
        return target / path.name

    def remove(self, path: Path, backup: Path) -> None:
        path.unlink()
        self._steps.append((path, backup))

    def undo(self) -> list[Path]:
        """Put every file back as it was; returns those that could not be."""
        left: list[Path] = []
        needed: set[Path] = set()  # history copies of files that could not be put back
        for path, backup in reversed(self._steps):
            if path in needed:
                continue
            try:
                if backup is None:
                    path.unlink(missing_ok=True)
                else:
                    data = backup.read_bytes()
                    atomic_write(path, lambda fh, data=data: fh.write(data), overwrite=True)
            except OSError as err:
                logger.error("cannot undo the save of %s: %s", path, err)
                left.append(path)
                if backup is not None:
                    needed.add(backup)
        for folder in reversed(self._dirs):
            with contextlib.suppress(OSError):  # not empty: something else is in it
                folder.rmdir()
        self._steps.clear()
        self._dirs.clear()
        return left


def _record_of(
    root: Path,
    image_path: Path,
    mask_path: Path,
    proposal_path: Path | None,
    plan: _Planned,
    provenance: Any,
    now: str,
    previous: Path | None = None,
) -> dict[str, Any]:
    """The :func:`correction_record` of a pair about to be written (paths under ``root``)."""

    def rel(path: Path | None) -> str | None:
        return None if path is None else path.relative_to(root).as_posix()

    return correction_record(
        image=str(rel(image_path)),
        mask=str(rel(mask_path)),
        slice_index=plan.source,
        digest=plan.digest,
        corrected=plan.mask,
        proposal=plan.proposal,
        provenance=provenance,
        proposal_file=rel(proposal_path),
        previous=rel(previous),
        time=now,
    )


def _write_new(
    journal: _Journal, root: Path, name: str, plan: _Planned, provenance: Any, now: str
) -> SavedPair:
    image_path, mask_path = root / "images" / f"{name}.png", root / "masks" / f"{name}.png"
    proposal_path = root / PROPOSALS_DIR / f"{name}.png" if plan.proposal is not None else None
    record_path = root / RECORDS_DIR / f"{name}.json"
    record = _record_of(root, image_path, mask_path, proposal_path, plan, provenance, now)
    # overwrite=False: refuse to replace a file that appeared since the name was chosen;
    # the atomic writes mean a crash never leaves half a file in the training data.
    journal.write(image_path, _png_writer(plan.pixels))
    journal.write(mask_path, _mask_writer(plan.mask))
    journal.write(record_path, _json_writer(record))
    if proposal_path is not None and plan.proposal is not None:
        journal.write(proposal_path, _mask_writer(plan.proposal))
    return SavedPair(
        tuple(plan.slices), image_path, mask_path, "written", record_path, proposal_path
    )


def _update(
    journal: _Journal,
    root: Path,
    image_path: Path,
    plan: _Planned,
    provenance: Any,
    now: str,
    history: Path,
) -> SavedPair:
    """Give an existing pair of the same image the new mask, after keeping in ``history``
    every file it replaces or removes: all masks of the image's stem (``foo.jpg`` and
    ``foo.png`` may both be there), its record and its proposal."""
    name = image_path.stem
    mask_path = root / "masks" / f"{name}.png"
    old_record = root / RECORDS_DIR / f"{name}.json"
    old_proposal = root / PROPOSALS_DIR / f"{name}.png"
    kept = {
        path: journal.keep(path, history)
        for path in (*_same_name_files(root / "masks", name), old_record, old_proposal)
        if path.is_file()
    }
    proposal_path = old_proposal if plan.proposal is not None else None
    record = _record_of(
        root, image_path, mask_path, proposal_path, plan, provenance, now, previous=history
    )
    # The mask and its record go together: a failure after either undoes both (_Journal).
    journal.write(mask_path, _mask_writer(plan.mask), overwrite=True, backup=kept.get(mask_path))
    journal.write(old_record, _json_writer(record), overwrite=True, backup=kept.get(old_record))
    for path, copy in kept.items():
        if path.parent.name == "masks" and path != mask_path:
            journal.remove(path, copy)  # one mask per stem for training
    if plan.proposal is not None:
        journal.write(
            old_proposal,
            _mask_writer(plan.proposal),
            overwrite=True,
            backup=kept.get(old_proposal),
        )
    elif old_proposal in kept:
        journal.remove(old_proposal, kept[old_proposal])  # the record says "unknown"
    return SavedPair(
        tuple(plan.slices), image_path, mask_path, "updated", old_record, proposal_path, history
    )


def save_for_training(
    image: np.ndarray,
    labels: np.ndarray,
    data_dir: str | Path,
    stem: str,
    *,
    rgb: bool,
    slices: Iterable[SliceIndex] | None = None,
    duplicates: str = "refuse",
    proposals: Mapping[SliceIndex, np.ndarray] | None = None,
    provenance: Mapping[str, Any] | Mapping[SliceIndex, Mapping[str, Any]] | None = None,
) -> SaveResult:
    """Write image/mask pairs in the ``images/`` + ``masks/`` layout ``training`` reads.

    Each 2D slice becomes ``images/<stem>[_zNNN].png`` and ``masks/<stem>[_zNNN].png``
    (mask: 255 where the label is non-zero, else 0), with ``records/<name>.json`` (a
    :func:`correction_record`) and, when the model's proposal is known,
    ``proposals/<name>.png``. New pairs never replace a file: if any name is taken, the
    whole batch gets the next free stem (``<stem>-2``...).

    An image whose pixels are in the dataset already (same :func:`image_digest`, under
    any name) is never saved twice. With the same mask, nothing is written (the pair is
    "unchanged"). With another mask, ``duplicates="refuse"`` raises
    :class:`DuplicateImageError` before anything at all is written;
    ``duplicates="update"`` first copies the existing pair's mask, record and proposal
    into ``history/<UTC time>/``, then writes the new ones over them. Slices of one call
    that show the same image make one pair. A save that fails part-way undoes everything
    it wrote, replaced or removed: the folder is as it was before the call.

    Args:
        image: Image layer data, ``(..., H, W)`` or ``(..., H, W, C)`` when ``rgb``.
        labels: Labels layer data, ``(..., H, W)``, same leading and YX shape as ``image``.
        data_dir: Dataset folder; ``images/`` and ``masks/`` are created inside it.
        stem: Base file name (sanitised with :func:`safe_stem`).
        rgb: Whether the last axis of ``image`` is colour.
        slices: Which slices to write; all of them when None.
        duplicates: ``"refuse"`` or ``"update"`` (see above).
        proposals: The model's foreground per slice (bool ``(H, W)``); a slice without
            one gets a record whose effort fields are None.
        provenance: The model run the proposals came from (:data:`PROVENANCE_KEYS`),
            or one such mapping per slice (keyed by slice index: a stack segmented
            slice by slice, perhaps with different models).

    Returns:
        A :class:`SaveResult`: the pairs, and which were written, updated or unchanged.

    Raises:
        DuplicateImageError: With ``duplicates="refuse"``, for an image saved before with
            another mask; nothing was written.
        ValueError: If the shapes do not match, no slice is selected, or two slices show
            the same image with different masks.
        OSError: If a file cannot be written; nothing is left written.
        PartialSaveError: If a file cannot be written and undoing the save failed too;
            its ``left`` names the files left as the save wrote them.
    """
    if duplicates not in DUPLICATE_CHOICES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_CHOICES}, got {duplicates!r}")
    spatial_shape = image.shape[:-1] if rgb else image.shape
    if tuple(labels.shape) != tuple(spatial_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the image's "
            f"{tuple(spatial_shape)}: save the Labels layer made from this image"
        )
    n_leading = len(spatial_shape) - 2
    slice_ids = list(iter_slices(spatial_shape[:n_leading]) if slices is None else slices)
    if not slice_ids:
        raise ValueError("no slice selected to save")
    for index in slice_ids:
        if len(index) != n_leading or any(
            not 0 <= i < n for i, n in zip(index, spatial_shape, strict=False)
        ):
            raise ValueError(f"slice {index} is outside the stack {spatial_shape[:n_leading]}")
    slice_ids = [tuple(int(i) for i in index) for index in slice_ids]
    checked = _check_proposals(proposals, labels, slice_ids)
    plans = _plan(image, labels, slice_ids, checked)

    root = Path(data_dir)
    images_dir, masks_dir = root / "images", root / "masks"
    digests = _DigestIndex(root)
    saved = _saved_images(images_dir, digests)
    clashes: list[tuple[SliceIndex, Path, Path | None]] = []
    for plan in plans:
        for path in saved.get(plan.digest, []):
            masks = _same_name_files(masks_dir, path.stem)
            mask_path = masks[0] if masks else None
            same = _mask_equals(mask_path, plan.mask)
            plan.existing.append((path, mask_path, same))
            if not same:
                clashes.append((plan.slices[0], path, mask_path))
    if clashes and duplicates == "refuse":
        digests.save(_image_names(images_dir))  # the next try need not decode them again
        raise DuplicateImageError(_clash_message(root, clashes), clashes)

    journal = _Journal()
    try:
        items = _write_plans(journal, root, plans, stem, provenance, digests)
    except BaseException as err:
        left = journal.undo()
        if left and isinstance(err, Exception):
            names = ", ".join(p.relative_to(root).as_posix() for p in left[:5])
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise PartialSaveError(
                f"{err}; the save could not be undone: {names}{more} left as it wrote "
                f"them (what they replaced is kept in {HISTORY_DIR}/)",
                left,
            ) from err
        raise
    digests.save(_image_names(images_dir))
    result = SaveResult(tuple(items))
    logger.info("saved to %s: %s", root, result.summary())
    return result


def _write_plans(
    journal: _Journal,
    root: Path,
    plans: list[_Planned],
    stem: str,
    provenance: Any,
    digests: _DigestIndex,
) -> list[SavedPair]:
    """Write the planned pairs; every change goes through ``journal`` (to undo on failure)."""
    images_dir = root / "images"
    for folder in (images_dir, root / "masks", root / RECORDS_DIR):
        journal.mkdir(folder)
    new = [plan for plan in plans if not plan.existing]
    if any(plan.proposal is not None for plan in plans):
        journal.mkdir(root / PROPOSALS_DIR)
    base = safe_stem(stem)
    if new:
        base = _free_stem(root, base, [plan.slices[0] for plan in new])
        if base != safe_stem(stem):
            logger.info("pairs named %r exist already in %s; writing %r", stem, root, base)

    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    history: Path | None = None
    items: list[SavedPair] = []
    for plan in plans:
        run = _run_of(provenance, plan)
        if not plan.existing:
            name = slice_stem(base, plan.slices[0])
            pair = _write_new(journal, root, name, plan, run, now.isoformat())
            digests.add(pair.image, plan.digest)  # what was written: no need to decode it
            items.append(pair)
            continue
        first: SavedPair | None = None
        for path, mask_path, same in plan.existing:
            if same and mask_path is not None:
                done = SavedPair(tuple(plan.slices), path, mask_path, "unchanged")
            else:
                if history is None:
                    history = journal.history(root, stamp)
                done = _update(journal, root, path, plan, run, now.isoformat(), history)
            if first is None or (first.status == "unchanged" and done.status == "updated"):
                first = done
        assert first is not None
        items.append(first)
    return items


def _run_of(provenance: Mapping[Any, Any] | None, plan: _Planned) -> Mapping[str, Any] | None:
    """The model run of a pair's slice: ``provenance`` itself, or its entry for the slice."""
    if not provenance:
        return None
    if any(isinstance(key, tuple) for key in provenance):
        return provenance.get(plan.source)
    return provenance


def _clash_message(root: Path, clashes: Sequence[tuple[SliceIndex, Path, Path | None]]) -> str:
    shown = []
    for index, path, mask in clashes[:3]:
        where = path.relative_to(root).as_posix()
        with_mask = f" with another mask ({mask.relative_to(root).as_posix()})" if mask else ""
        shown.append(f"{_slice_label(index)} is saved already as {where}{with_mask}")
    more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
    return (
        f"{'; '.join(shown)}{more} in {root}: update the saved mask, or save nothing "
        "(a second copy would be a twin in training)"
    )
