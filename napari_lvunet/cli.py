"""The ``napari-lvunet`` command: segment files, folders and videos headless, or open napari.

Usage::

    napari-lvunet segment INPUT [INPUT ...] [--out DIR] [--recursive] [--no-overlay]
                          [--resume] [--overwrite] [--summary FILE] [--no-progress]
                          [--weights NAME_OR_FILE] [--sizing auto|resize|tiles]
                          [--device auto|cpu|cuda|mps] [--backend auto|onnxruntime|torch]
                          [--threshold 0.5] [--output semantic|instances] [--axes AXES]
    napari-lvunet view [IMAGE] [--weights NAME_OR_FILE] [--headless] [--out DIR] ...

``segment`` takes image files (PNG, JPEG, BMP, WebP, TIFF), videos (MP4, AVI, MOV, MKV),
folders (their images and videos; ``--recursive``: and their subfolders') and globs
(quoted, e.g. ``"scans/**/*.png"``). Per input it writes into ``--out`` (default: the
current folder; sub-paths below a folder or a glob's fixed part are kept):

* an image: ``<stem>_mask.png`` (binary: 0/255; multi-class: class index; instances:
  instance number, 16-bit when there are more than 255) and ``<stem>_overlay.png`` (the
  labels' colours and outlines over the image; at most 4096 px on a side);
* a stack (multi-page TIFF): ``<stem>_mask.tif``;
* a video: ``<stem>_mask.mp4`` (lossless, 0/255), ``<stem>_overlay.mp4`` (same frame rate)
  and ``<stem>_frames.csv`` (frame, time_s, area_px, area_fraction, bbox, n_regions,
  mean_probability);

``--no-overlay`` leaves out the overlays. One summary, ``summary.csv`` in ``--out``
(``--summary FILE``), lists every input with its status and foreground statistics; rows
of earlier runs into the same file are kept. A progress bar runs on a terminal.

The outputs of one input land together (temporary files, moved into place at the end).
Existing outputs are never replaced unless ``--overwrite`` is given; ``--resume`` skips
inputs whose outputs all exist. An input that cannot be read or segmented is reported
(one line on stderr) and skipped; the others are still written.

Exit status: 0 when every input was segmented (or skipped by ``--resume``); 1 when some
input failed, or the weights could not be loaded; 2 for bad usage, where nothing is
processed: unknown options, an output folder that cannot be written, two inputs that
would write the same file, a ``--summary`` file that is not a summary.

``view`` opens napari with the image (default: the plugin's sample polyp image) and the
LV-UNet dock widget. With ``--headless``, or on Linux without a display, it runs
``segment`` on that image instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import read_image as read_image_file

__all__ = ["main", "open_viewer", "read_image", "run_segment", "sample_image_path"]

logger = logging.getLogger(__name__)

_PROG = "napari-lvunet"


class CLIError(Exception):
    """A problem to report on one line, with exit status 1."""


# --------------------------------------------------------------------------- files


def sample_image_path() -> Path:
    """The plugin's sample image (a Kvasir-SEG test-split polyp frame).

    Returns:
        Path of the sample RGB image shipped in ``napari_lvunet/sample_data``.

    Raises:
        CLIError: If the package was installed without its sample data.
    """
    from ._sample_data import SAMPLE_DIR

    images = sorted(
        p for p in SAMPLE_DIR.glob("*.jpg") if not p.stem.endswith("_mask")
    )  # the single frames; masks and the stack are PNG/TIFF
    if not images:
        raise CLIError(f"no sample image in {SAMPLE_DIR}: reinstall napari-lvunet")
    return images[0]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as napari would hold it.

    Args:
        path: A PNG, JPEG, BMP, ... (read with Pillow; palette images become RGB) or a
            TIFF (read with tifffile, so 16-bit, float and multi-page stacks survive).

    Returns:
        The pixel array: ``(H, W)``, ``(H, W, 3|4)`` or a TIFF's stack.

    Raises:
        CLIError: If the file does not exist or cannot be read as an image.
    """
    path = Path(path)
    if not path.exists():
        raise CLIError(f"no such file: {path}")
    if not path.is_file():
        raise CLIError(f"not a file: {path}")
    try:
        return read_image_file(path)
    except Exception as err:  # Pillow and tifffile raise many types for a bad file
        raise CLIError(f"cannot read {path} as an image: {err}") from err


def _load_segmenter(args: argparse.Namespace) -> Any:
    """The engine's segmenter for ``--weights``, ``--device`` and ``--backend``."""
    from . import weights
    from .inference import default_pool

    name = args.weights or weights.DEFAULT_MODEL
    try:
        return default_pool().get(name, device=args.device, backend=args.backend)
    except weights.WeightsError as err:
        raise CLIError(str(err)) from err
    except (OSError, ValueError, ImportError) as err:
        raise CLIError(f"cannot load weights {name}: {err}") from err


class _Progress:
    """A tqdm bar on stderr (off when stderr is not a terminal, or with --no-progress),
    and the lines printed about each input, written around the bar."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, unit="frame", disable=None if enabled else True)

    def update(self, frames: int) -> None:
        self.bar.update(frames)

    def report(self, source: str, status: str, detail: str) -> None:
        if status == "ok":
            for path in detail.split(", "):
                self._tqdm.write(f"wrote {path}", file=sys.stdout)
        elif status == "skipped":
            self._tqdm.write(f"skipped {source}: its outputs exist (--resume)", file=sys.stdout)
        else:
            self._tqdm.write(f"{_PROG}: error: {detail}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def run_segment(args: argparse.Namespace, inputs: Sequence[str]) -> int:
    """``napari-lvunet segment``: see the module docstring. Returns the exit status."""
    from . import batch

    options = batch.BatchOptions(
        threshold=args.threshold,
        sizing=args.sizing,
        output=args.output,
        axes=args.axes,
        overlay=not args.no_overlay,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    out = Path(args.out)
    found, problems = batch.collect_inputs(inputs, recursive=args.recursive)
    try:
        jobs = batch.plan_jobs(found, out, options)
        summary = None
        if jobs:
            batch.check_writable(out)
            path = Path(args.summary) if args.summary else out / "summary.csv"
            summary = batch.SummaryFile(path, overwrite=args.overwrite)
    except batch.BatchError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    needs_model = any(j.error is None and not batch.is_complete(j, options) for j in jobs)
    segmenter = _load_segmenter(args) if needs_model else None
    progress = _Progress(sum(j.frames for j in jobs), enabled=not args.no_progress)
    try:
        for argument, message in problems:
            progress.report(argument, "failed", message)
        rows = batch.run_batch(
            jobs,
            segmenter,
            options,
            summary=summary,
            progress=progress.update,
            report=progress.report,
            failures=problems,
        )
    finally:
        progress.close()
    failed = sum(row["status"] == "failed" for row in rows)
    if summary is not None:
        print(f"wrote {summary.path}")
    if len(rows) > 1:
        skipped = sum(row["status"] == "skipped" for row in rows)
        print(
            f"{_PROG}: {len(rows) - failed - skipped} segmented, {skipped} skipped, "
            f"{failed} failed",
            file=sys.stderr,
        )
    return 1 if failed else 0


def open_viewer(
    image_path: str | os.PathLike[str] | None = None,
    *,
    weights: str | None = None,
    show: bool = True,
) -> Any:
    """Open napari with an image and the LV-UNet dock widget.

    Args:
        image_path: The image or video to open; ``None``: the plugin's sample polyp
            image (with its ground truth as a hidden Labels layer).
        weights: A ``.safetensors`` file to add to the widget's model list and select.
        show: Show the window (``False`` for tests).

    Returns:
        The ``napari.Viewer``.

    Raises:
        CLIError: For a missing or unreadable image.
    """
    from .video import is_video

    video = image_path is not None and is_video(image_path)
    image = read_image(image_path) if image_path is not None and not video else None
    if video and not Path(image_path).is_file():  # type: ignore[arg-type]
        raise CLIError(f"no such file: {image_path}")
    import napari

    viewer = napari.Viewer(show=show)
    if video:
        viewer.open(str(image_path), plugin="napari-lvunet")
    elif image is None:
        viewer.open_sample("napari-lvunet", "polyp")
    else:
        rgb = image.ndim >= 3 and image.shape[-1] in (3, 4)
        viewer.add_image(image, name=Path(image_path).stem, rgb=rgb)  # type: ignore[arg-type]
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    if weights is not None:
        if Path(weights).suffix == ".safetensors":
            widget.add_weights_file(weights)
        else:
            logger.warning("--weights %s: the widget lists registry models itself", weights)
    return viewer


def _has_display() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


# --------------------------------------------------------------------------- parsing


def _add_segment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        metavar="NAME_OR_FILE",
        help="registry model name or .safetensors file (default: the default model)",
    )
    parser.add_argument(
        "--out", default=".", metavar="DIR", help="output folder (default: current folder)"
    )
    parser.add_argument(
        "--sizing",
        choices=("auto", "resize", "tiles"),
        default="auto",
        help="auto (default): resize whole unless the image is far larger than the training "
        "images, then tiles; resize: to the training size; tiles: at the training scale",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "torch"),
        default="auto",
        help="auto (default): ONNX Runtime on the CPU, PyTorch on GPUs",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="foreground probability (default 0.5)"
    )
    parser.add_argument(
        "--output",
        choices=("semantic", "instances"),
        default="semantic",
        help="semantic mask (default) or numbered connected components",
    )
    parser.add_argument("--axes", help="the image's axes, e.g. YXC, CYX, ZYX (default: inferred)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="also segment the subfolders of folders"
    )
    parser.add_argument(
        "--no-overlay", action="store_true", help="write masks only (no overlay PNGs or videos)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip inputs whose outputs all exist already"
    )
    parser.add_argument(
        "--summary", metavar="FILE", help="the summary CSV (default: OUT/summary.csv)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="LV-UNet segmentation: headless, or in napari."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    seg = commands.add_parser(
        "segment",
        help="segment images, folders, globs and videos; write masks, overlays, a summary CSV",
        description="Segment images, folders, globs and videos. Exit status: 0 all done, "
        "1 some input failed (reported, skipped), 2 bad usage (nothing done).",
    )
    seg.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image (PNG, JPEG, TIFF, ...), video (MP4, AVI, MOV, MKV), folder or quoted glob",
    )
    _add_segment_options(seg)
    _add_batch_options(seg)
    view = commands.add_parser(
        "view", help="open napari with an image (default: the sample) and the LV-UNet widget"
    )
    view.add_argument(
        "image", nargs="?", metavar="IMAGE", help="image or video file (default: the sample)"
    )
    view.add_argument(
        "--headless",
        action="store_true",
        help="do not open a window: segment the image instead (also without a display)",
    )
    _add_segment_options(view)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``napari-lvunet`` command.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when an input failed or the weights could not be
        loaded (reported on stderr), 2 on bad usage (nothing done).
    """
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("napari_lvunet")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "segment":
            return run_segment(args, args.inputs)
        if not args.headless and _has_display():
            viewer = open_viewer(args.image, weights=args.weights)
            import napari

            napari.run()
            del viewer
            return 0
        image = args.image if args.image is not None else str(sample_image_path())
        if not args.headless:
            print(f"{_PROG}: no display found, running `segment` on {image} instead")
        for name in ("recursive", "no_overlay", "resume", "no_progress"):
            setattr(args, name, False)
        args.summary = None
        return run_segment(args, [image])
    except CLIError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
