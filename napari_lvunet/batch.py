"""Batch segmentation of files, folders, globs and videos: what ``napari-lvunet segment`` runs.

Inputs. :func:`collect_inputs` expands the command line's arguments: a file is itself, a
folder gives its images and videos (``recursive``: and its subfolders'), a glob (``*``,
``?``, ``[...]``, ``**``) its matches; duplicates are dropped, order is kept. An argument
that matches nothing is reported as a failed input.

Outputs, per input, into the output folder (sub-paths below a folder or a glob's fixed
part are kept, so ``data/a/x.png`` and ``data/b/x.png`` do not collide):

* a 2D image: ``<stem>_mask.png`` (binary: 0 / 255; classes: the class index; instances:
  numbered, 16-bit above 255) and ``<stem>_overlay.png`` (tint and outlines; images
  larger than 4096 px on a side get it at preview size, 4096 px);
* a stack (a multi-page TIFF): ``<stem>_mask.tif``;
* a video: ``<stem>_mask.mp4`` (lossless), ``<stem>_overlay.mp4`` and
  ``<stem>_frames.csv`` (one row per frame, :data:`napari_lvunet.video.FRAME_CSV_COLUMNS`).

The outputs of one input are written under temporary names and land together
(``io.staged_files``): an input is either complete or absent. One summary CSV
(:data:`SUMMARY_COLUMNS`) lists every input, its status and its foreground statistics,
pooled over frames for stacks and videos; its ``outputs`` are relative to the summary's
folder. Each image's statistics are also stored in its mask file (a PNG text chunk, a
TIFF description), and a video's in its frame table, so a resumed run writes the same
summary as one uninterrupted run.

Existing outputs: never replaced without ``overwrite``. With ``resume``, an input whose
outputs all exist is skipped (its summary row is read back from them); an input with
only some of them is an error unless ``overwrite``.

Pipeline. Images are decoded by two threads ahead of the engine, segmented in the calling
thread, and drawn, encoded and written by a third: decoding, ONNX Runtime and PNG
encoding all release the GIL, so the stages overlap. Videos run their own three-stage
pipeline (:func:`napari_lvunet.video.segment_video`).
"""

from __future__ import annotations

import csv
import glob
import io as _stdio
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io import TIFF_SUFFIXES, atomic_write, read_image, staged_files
from .video import VIDEO_SUFFIXES, frame_stats, is_video, open_video, overlay

__all__ = [
    "IMAGE_SUFFIXES",
    "SUMMARY_COLUMNS",
    "BatchError",
    "BatchOptions",
    "Job",
    "SummaryFile",
    "check_writable",
    "collect_inputs",
    "is_complete",
    "plan_jobs",
    "run_batch",
]

logger = logging.getLogger(__name__)

#: File name endings read as images (compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", *TIFF_SUFFIXES)
#: Columns of the summary CSV.
SUMMARY_COLUMNS = (
    "input",
    "kind",
    "status",
    "frames",
    "height",
    "width",
    "area_px",
    "area_fraction",
    "frames_with_foreground",
    "n_regions",
    "mean_probability",
    "outputs",
    "error",
)
#: Overlays of larger images are drawn at this longest side (the mask keeps full size).
OVERLAY_MAX_SIDE = 4096
_STATS_KEY = "napari-lvunet-stats"  # PNG text chunk / TIFF description holding the row
_PREFETCH = 4  # images decoded ahead of the engine
_READ_THREADS = 2
_WRITE_QUEUE = 4
_SUMMARY_EVERY_S = 2.0  # the summary is rewritten at most this often while running


class BatchError(Exception):
    """A problem with the whole batch (exit status 2): nothing was processed."""


@dataclass(frozen=True)
class Job:
    """One input and the files it will write."""

    source: Path
    kind: str  # "image", "stack" or "video"
    outputs: tuple[Path, ...]
    frames: int = 1
    error: str | None = None  # known before any work (unreadable, existing outputs, ...)

    @property
    def mask(self) -> Path:
        return self.outputs[0]


@dataclass
class BatchOptions:
    """What to write and how to segment (see ``Segmenter.segment``)."""

    threshold: float = 0.5
    sizing: str = "auto"
    output: str = "semantic"
    axes: str | None = None
    overlay: bool = True
    overwrite: bool = False
    resume: bool = False


@dataclass
class _Row:
    values: dict[str, Any] = field(default_factory=dict)

    def csv_row(self) -> list[Any]:
        return [self.values.get(c, "") for c in SUMMARY_COLUMNS]


# --------------------------------------------------------------------------- inputs


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob_root(pattern: str) -> Path:
    """The fixed folder in front of a glob's first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _wanted(path: Path) -> bool:
    suffix = path.suffix.lower()
    return path.is_file() and (suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES)


def collect_inputs(
    arguments: Sequence[str | os.PathLike[str]], *, recursive: bool = False
) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Expand files, folders and globs into the files to segment.

    Args:
        arguments: Paths of files or folders, or glob patterns.
        recursive: Also take the files in subfolders of folder arguments.

    Returns:
        ``(inputs, problems)``: ``inputs`` are ``(file, root)`` pairs, in argument order
        without duplicates, ``root`` being the folder the output names are relative to;
        ``problems`` are ``(argument, message)`` for arguments that matched nothing.
    """
    inputs: list[tuple[Path, Path]] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path, root: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            inputs.append((path, root))

    for argument in arguments:
        text = str(argument)
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(p for p in path.glob(pattern) if _wanted(p))
            if not found:
                problems.append((text, f"no images or videos in the folder {path}"))
            for p in found:
                add(p, path)
        elif path.exists():
            if not path.is_file():
                problems.append((text, f"not a file: {path}"))
            else:
                add(path, path.parent)
        elif _is_glob(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            found = [p for p in found if _wanted(p)]
            if not found:
                problems.append((text, f"no images or videos match {text}"))
            for p in found:
                add(p, _glob_root(text))
        else:
            problems.append((text, f"no such file: {path}"))
    return inputs, problems


def _output_base(source: Path, root: Path, out_dir: Path) -> Path:
    try:
        relative = source.resolve().relative_to(root.resolve()).parent
    except ValueError:
        relative = Path()
    return out_dir / relative / source.stem


def _stack_shape(path: Path) -> tuple[int, ...]:
    """A TIFF's array shape, from its header (no pixels read)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tuple(int(n) for n in tif.series[0].shape)


def plan_jobs(
    inputs: Sequence[tuple[Path, Path]], out_dir: str | os.PathLike[str], options: BatchOptions
) -> list[Job]:
    """Name every input's outputs and find what can be known before any work.

    Args:
        inputs: From :func:`collect_inputs`.
        out_dir: The output folder.
        options: See :class:`BatchOptions`.

    Returns:
        One :class:`Job` per input; a job with an ``error`` will not run (unreadable
        video or TIFF header, bad axes, existing outputs without ``overwrite`` or
        ``resume``, only some outputs present).

    Raises:
        BatchError: If two inputs would write the same output file.
    """
    from .inference import infer_axes

    out = Path(out_dir)
    jobs: list[Job] = []
    owners: dict[Path, Path] = {}
    for source, root in inputs:
        base = _output_base(source, root, out)
        error = None
        frames = 1
        if is_video(source):
            kind = "video"
            names = ["_mask.mp4", "_overlay.mp4", "_frames.csv"]
            if not options.overlay:
                names.remove("_overlay.mp4")
            try:
                frames = len(open_video(source))
            except ValueError as err:
                error = str(err)
        else:
            kind, names = "image", ["_mask.png", "_overlay.png"]
            if source.suffix.lower() in TIFF_SUFFIXES:
                try:
                    shape = _stack_shape(source)
                    axes = options.axes.upper() if options.axes else infer_axes(shape)
                    if len(axes.replace("C", "")) > 2:
                        kind, names = "stack", ["_mask.tif"]
                        frames = math.prod(shape[axes.index(a)] for a in axes if a in "TZ")
                except Exception as err:  # a bad header is this input's problem only
                    error = f"cannot read {source} as an image: {err}"
            if kind == "image" and not options.overlay:
                names.remove("_overlay.png")
        outputs = tuple(base.with_name(base.name + n) for n in names)
        for path in outputs:
            other = owners.setdefault(path.resolve(), source)
            if other != source:
                raise BatchError(
                    f"{other} and {source} would both write {path}: "
                    "segment them into different --out folders"
                )
        if error is None:
            error = _existing_outputs_error(outputs, options)
        jobs.append(Job(source, kind, outputs, frames, error))
    return jobs


def _existing_outputs_error(outputs: Sequence[Path], options: BatchOptions) -> str | None:
    existing = [p for p in outputs if p.exists()]
    if not existing or options.overwrite:
        return None
    if options.resume and len(existing) == len(outputs):
        return None  # complete: skipped
    if options.resume:
        missing = [p.name for p in outputs if not p.exists()]
        return (
            f"{existing[0]} exists but {', '.join(missing)} does not (an earlier run of "
            "other settings?); pass --overwrite to redo it"
        )
    return (
        f"{existing[0]} exists; pass --resume to skip inputs already done, "
        "or --overwrite to replace them"
    )


def is_complete(job: Job, options: BatchOptions) -> bool:
    """Whether ``resume`` skips ``job``: all its outputs exist (and no ``overwrite``)."""
    return options.resume and not options.overwrite and all(p.exists() for p in job.outputs)


# --------------------------------------------------------------------------- writing


def _mask_for_file(labels: np.ndarray, binary: bool, semantic: bool) -> np.ndarray:
    """What the mask file holds: 0/255 for a binary mask (visible in any viewer)."""
    if binary and semantic:
        return np.where(labels > 0, np.uint8(255), np.uint8(0))
    if labels.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{int(labels.max())} objects do not fit a 16-bit mask file")
    return labels.astype(np.uint8 if labels.max() <= 255 else np.uint16)


def _pooled(frames: Sequence[dict[str, Any]], height: int, width: int) -> dict[str, Any]:
    """Summary values of per-frame statistics (strings as the CSVs hold them)."""
    area = sum(int(s["area_px"]) for s in frames)
    with_fg = [s for s in frames if int(s["area_px"])]
    weighted = [
        (float(s["mean_probability"]) * int(s["area_px"]), int(s["area_px"]))
        for s in with_fg
        if s["mean_probability"] != ""
    ]
    probability = sum(w for w, _ in weighted) / sum(n for _, n in weighted) if weighted else None
    return {
        "frames": len(frames),
        "height": height,
        "width": width,
        "area_px": area,
        "area_fraction": _fmt(area / max(1, len(frames) * height * width)),
        "frames_with_foreground": len(with_fg),
        "n_regions": sum(int(s["n_regions"]) for s in with_fg),
        "mean_probability": "" if probability is None else _fmt(probability),
    }


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _frame_table(labels: np.ndarray, probs: np.ndarray | None) -> list[dict[str, Any]]:
    """Per-2D-frame statistics of labels ``(..., H, W)`` (probabilities alike, or
    ``(C, ..., H, W)``), with floats formatted as the CSVs hold them."""
    height, width = labels.shape[-2:]
    flat = labels.reshape(-1, height, width)
    if probs is not None and probs.ndim == labels.ndim + 1:  # class probabilities
        flat_probs = np.moveaxis(probs.reshape(probs.shape[0], -1, height, width), 0, 1)
    elif probs is not None:
        flat_probs = probs.reshape(-1, height, width)
    else:
        flat_probs = [None] * len(flat)
    table = []
    for frame_labels, frame_probs in zip(flat, flat_probs, strict=True):
        stats = frame_stats(frame_labels, frame_probs)
        if stats["mean_probability"] != "":
            stats["mean_probability"] = _fmt(stats["mean_probability"])
        table.append(stats)
    return table


def _save_png(path: Path, array: np.ndarray, text: str | None = None) -> None:
    from PIL import Image, PngImagePlugin

    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(_STATS_KEY, text)
    # Level 1: masks compress well anyway; overlays encode 3-4x faster than at level 6.
    Image.fromarray(array).save(path, format="PNG", compress_level=1, pnginfo=info)


def _preview(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image and labels reduced so the longest side is at most OVERLAY_MAX_SIDE."""
    step = math.ceil(max(labels.shape) / OVERLAY_MAX_SIDE)
    if step <= 1:
        return image, labels
    from PIL import Image

    small = labels[::step, ::step]
    rgb = np.asarray(Image.fromarray(image).reduce(step))
    return rgb[: small.shape[0], : small.shape[1]], small


def _overlay_rgb(image: np.ndarray, axes: str) -> np.ndarray:
    """The image channel-last, as uint8 RGB for drawing on (any dtype, any range)."""
    from .preprocess import to_unit_rgb

    frame = np.moveaxis(image, axes.index("C"), -1) if "C" in axes else image
    if frame.dtype == np.uint8 and (frame.ndim == 2 or frame.shape[-1] in (3, 4)):
        return frame[..., :3] if frame.ndim == 3 else np.repeat(frame[..., None], 3, axis=-1)
    return (np.clip(to_unit_rgb(frame), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write_image_outputs(
    job: Job,
    image: np.ndarray,
    axes: str,
    labels: np.ndarray,
    probs: np.ndarray | None,
    binary: bool,
    options: BatchOptions,
) -> dict[str, Any]:
    """Mask (+ overlay) of one image or stack, landing together; returns its row values."""
    import tifffile

    height, width = labels.shape[-2:]
    row = _pooled(_frame_table(labels, probs), height, width)
    text = json.dumps({k: row[k] for k in row})
    mask = _mask_for_file(labels, binary, options.output == "semantic")
    job.mask.parent.mkdir(parents=True, exist_ok=True)
    with staged_files(job.outputs, overwrite=options.overwrite) as temps:
        if job.kind == "stack":
            tifffile.imwrite(
                temps[0], mask, photometric="minisblack", compression="zlib", description=text
            )
        else:
            _save_png(temps[0], mask, text)
            if len(temps) > 1:
                _save_png(temps[1], overlay(*_preview(_overlay_rgb(image, axes), labels)))
    return row


def _row_from_outputs(job: Job) -> dict[str, Any]:
    """A complete job's summary values, read back from its own outputs."""
    if job.kind == "video":
        with open(job.outputs[-1], newline="") as file:
            table = list(csv.DictReader(file))
        video = open_video(job.source)
        return _pooled(table, *video.shape[1:3])
    if job.kind == "stack":
        import tifffile

        with tifffile.TiffFile(job.mask) as tif:
            text = tif.pages[0].description
    else:
        from PIL import Image

        with Image.open(job.mask) as img:
            text = img.info.get(_STATS_KEY)
    if not text:
        raise ValueError(f"{job.mask} holds no statistics (not written by napari-lvunet?)")
    return json.loads(text)


# --------------------------------------------------------------------------- running


class SummaryFile:
    """The summary CSV of an output folder, rewritten whole (atomically) as inputs finish.

    Rows of earlier runs into the same file are kept, except those of inputs this run
    processes again (they are replaced): the file lists everything segmented into it.

    Args:
        path: The CSV file.
        overwrite: Replace ``path`` even if it is not a summary this module wrote.

    Raises:
        BatchError: If ``path`` exists, is not such a summary and ``overwrite`` is False.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self._previous: list[list[str]] = []
        self._last = time.monotonic()
        if not self.path.exists():
            return
        try:
            with open(self.path, newline="") as file:
                table = list(csv.reader(file))
        except (OSError, UnicodeDecodeError, csv.Error):
            table = []
        if table and table[0] == list(SUMMARY_COLUMNS):
            self._previous = table[1:]
        elif not overwrite:
            raise BatchError(
                f"{self.path} exists and is not a napari-lvunet summary: pass --overwrite "
                "to replace it, or --summary FILE to write another"
            )

    def write(self, rows: Sequence[_Row], *, now: bool = True) -> None:
        if not now and time.monotonic() - self._last < _SUMMARY_EVERY_S:
            return
        current = [row.csv_row() for row in rows]
        inputs = {str(row[0]) for row in current}
        kept = [row for row in self._previous if row and row[0] not in inputs]
        text = _stdio.StringIO()
        table = csv.writer(text)
        table.writerow(SUMMARY_COLUMNS)
        table.writerows(kept + current)
        data = text.getvalue().encode()
        atomic_write(self.path, lambda file: file.write(data), overwrite=True)
        self._last = time.monotonic()


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` if needed and prove a file can be made in it.

    Raises:
        BatchError: If it cannot be created or written to.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".napari-lvunet-probe-"):
            pass
    except OSError as err:
        raise BatchError(f"cannot write to the output folder {folder}: {err}") from err


def run_batch(
    jobs: Sequence[Job],
    segmenter: Any,
    options: BatchOptions,
    *,
    summary: SummaryFile | str | os.PathLike[str] | None,
    failures: Sequence[tuple[str, str]] = (),
    progress: Callable[[int], object] | None = None,
    report: Callable[[str, str, str], object] | None = None,
) -> list[dict[str, Any]]:
    """Segment every job; write outputs and the summary CSV.

    Args:
        jobs: From :func:`plan_jobs`.
        segmenter: An engine ``Segmenter`` (or anything with its ``segment`` and
            ``num_classes``); ``None`` is allowed when no job needs it.
        options: See :class:`BatchOptions`.
        summary: The summary CSV (a :class:`SummaryFile`, or its path); ``None``: none.
        failures: ``(argument, message)`` for arguments that matched nothing; listed in
            the summary as failed.
        progress: Called with the number of frames just finished (images count 1).
        report: Called as ``report(input, status, detail)`` when an input is finished:
            status ``"ok"`` (detail: the files written), ``"skipped"`` or ``"failed"``
            (detail: the error).

    Returns:
        The summary rows, as the CSV holds them: dicts of :data:`SUMMARY_COLUMNS` to
        strings.
    """
    rows = [_Row({"input": a, "kind": "", "status": "failed", "error": m}) for a, m in failures]
    job_rows = [_Row({"input": str(j.source), "kind": j.kind}) for j in jobs]
    rows.extend(job_rows)
    if summary is not None and not isinstance(summary, SummaryFile):
        summary = SummaryFile(summary, overwrite=options.overwrite)
    lock = threading.Lock()
    base = summary.path.parent if summary is not None else None

    def finish(index: int, status: str, values: dict[str, Any] | None, detail: str) -> None:
        job = jobs[index]
        with lock:
            row = job_rows[index]
            row.values.update(values or {})
            row.values["status"] = status
            if status == "failed":
                row.values["error"] = detail
            else:
                row.values["outputs"] = ";".join(_relative(p, base) for p in job.outputs)
            if summary is not None:
                summary.write(rows, now=False)
        if report is not None:
            shown = ", ".join(str(p) for p in job.outputs) if status != "failed" else detail
            report(str(job.source), status, shown)
        if progress is not None:
            progress(job.frames)

    try:
        _run_jobs(jobs, segmenter, options, finish)
    finally:
        if summary is not None and (jobs or failures):
            summary.write(rows)
    return [{c: str(v) for c, v in zip(SUMMARY_COLUMNS, r.csv_row(), strict=True)} for r in rows]


def _run_jobs(
    jobs: Sequence[Job],
    segmenter: Any,
    options: BatchOptions,
    finish: Callable[[int, str, dict[str, Any] | None, str], None],
) -> None:
    binary = segmenter is not None and segmenter.num_classes == 1
    kwargs = {"threshold": options.threshold, "sizing": options.sizing, "output": options.output}
    to_write: queue.Queue[Any] = queue.Queue(maxsize=_WRITE_QUEUE)

    def writer() -> None:
        while (item := to_write.get()) is not None:
            index, image, axes, labels, probs = item
            try:
                values = _write_image_outputs(
                    jobs[index], image, axes, labels, probs, binary, options
                )
            except Exception as err:
                finish(index, "failed", None, _message(jobs[index], err))
            else:
                finish(index, "ok", values, "")

    def load(job: Job) -> tuple[np.ndarray, str]:
        from .inference import infer_axes

        image = read_image(job.source)
        axes = options.axes.upper() if options.axes else infer_axes(image.shape)
        return image, axes

    write_thread = threading.Thread(target=writer, name="lvunet-batch-write", daemon=True)
    write_thread.start()
    pending: deque[tuple[int, Future[Any] | None]] = deque()
    order: Iterator[int] = iter(range(len(jobs)))
    try:
        with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="lvunet-batch-read") as pool:

            def refill() -> None:
                while len(pending) < _PREFETCH:
                    index = next(order, None)
                    if index is None:
                        return
                    job = jobs[index]
                    runs = job.error is None and not is_complete(job, options)
                    wants_read = runs and job.kind != "video"
                    pending.append((index, pool.submit(load, job) if wants_read else None))

            refill()
            while pending:
                index, future = pending.popleft()
                refill()
                job = jobs[index]
                if job.error is not None:
                    finish(index, "failed", None, job.error)
                    continue
                if is_complete(job, options):
                    try:
                        finish(index, "skipped", _row_from_outputs(job), "")
                    except Exception as err:
                        finish(index, "failed", None, f"{job.source}: cannot resume: {err}")
                    continue
                if job.kind == "video":
                    try:
                        values = _run_video(job, segmenter, options, kwargs)
                    except Exception as err:
                        finish(index, "failed", None, _message(job, err))
                    else:
                        finish(index, "ok", values, "")
                    continue
                assert future is not None
                try:
                    image, axes = future.result()
                except Exception as err:  # Pillow and tifffile raise many types
                    finish(index, "failed", None, _message(job, err, reading=True))
                    continue
                try:
                    labels, probs = segmenter.segment(
                        image, axes=axes, return_probabilities=True, **kwargs
                    )
                except Exception as err:
                    finish(index, "failed", None, _message(job, err))
                    continue
                to_write.put((index, image, axes, labels, probs))
    finally:
        to_write.put(None)
        write_thread.join()


def _run_video(
    job: Job, segmenter: Any, options: BatchOptions, kwargs: dict[str, Any]
) -> dict[str, Any]:
    from .video import segment_video

    job.mask.parent.mkdir(parents=True, exist_ok=True)
    overlay_path = job.outputs[1] if options.overlay else None
    summary = segment_video(
        job.source,
        segmenter,
        mask_path=job.mask,
        overlay_path=overlay_path,
        csv_path=job.outputs[-1],
        overwrite=options.overwrite,
        **kwargs,
    )
    with open(job.outputs[-1], newline="") as file:
        table = list(csv.DictReader(file))
    return _pooled(table, summary.height, summary.width)


def _relative(path: Path, base: Path | None) -> str:
    """``path`` as the summary lists it: relative to the summary's folder when inside it."""
    if base is None:
        return str(path)
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _message(job: Job, err: BaseException, *, reading: bool = False) -> str:
    """One line naming the input."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if reading:
        return f"cannot read {job.source} as an image: {text}"
    return text if str(job.source) in text else f"{job.source}: {text}"
