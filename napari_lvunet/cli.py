"""The ``napari-lvunet`` command: segment images headless, or open napari with the widget.

Usage::

    napari-lvunet segment IMAGE [--weights NAME_OR_FILE] [--out DIR] [--sizing resize|tiles]
                                [--device auto|cpu|cuda|mps] [--backend auto|onnxruntime|torch]
                                [--threshold 0.5] [--output semantic|instances] [--overwrite]
    napari-lvunet view [IMAGE] [--weights NAME_OR_FILE] [--headless] [--out DIR] ...

``segment`` writes ``<stem>_mask.png`` (binary: 0/255; multi-class: class index;
instances: instance number, 16-bit when there are more than 255) and ``<stem>_overlay.png``
(the mask's colours and outlines over the image) into ``--out`` (default: the current
folder) and prints where. Stacks (multi-page TIFF) give ``<stem>_mask.tif`` and no
overlay. Existing files are never replaced unless ``--overwrite`` is given.

``view`` opens napari with the image (default: the plugin's sample polyp image) and the
LV-UNet dock widget. With ``--headless``, or on Linux without a display, it runs
``segment`` on that image instead.

Errors (missing or unreadable files, bad options, unusable weights) are one line on
stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .io import atomic_write
from .io import read_image as read_image_file

__all__ = ["main", "read_image", "sample_image_path", "segment_file"]

logger = logging.getLogger(__name__)

_PROG = "napari-lvunet"
# Overlay colours: outline of every object, over a translucent fill.
_OUTLINE_RGB = (255, 255, 0)
_FILL_ALPHA = 0.35


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


def _overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB uint8: the image with translucent label colours and yellow outlines."""
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    from .preprocess import to_unit_rgb

    rgb = to_unit_rgb(image)
    if labels.max() > 0:
        rgb = label2rgb(labels, image=rgb, bg_label=0, alpha=_FILL_ALPHA, saturation=1.0)
    out = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    out[find_boundaries(labels, mode="inner")] = _OUTLINE_RGB
    return out


def _mask_for_file(labels: np.ndarray, binary: bool, semantic: bool) -> np.ndarray:
    """What the mask file holds: 0/255 for a binary mask (visible in any viewer)."""
    if binary and semantic:
        return (labels > 0).astype(np.uint8) * 255
    if labels.max() > np.iinfo(np.uint16).max:
        raise CLIError(f"{int(labels.max())} objects do not fit a 16-bit mask file")
    return labels.astype(np.uint8 if labels.max() <= 255 else np.uint16)


def _write_atomic(path: Path, write: Callable[[BinaryIO], None], overwrite: bool) -> None:
    """Write via a temporary file in the same folder, then move it into place: never
    half a file, and (without ``overwrite``) never over a file that exists, even one
    created meanwhile."""
    try:
        atomic_write(path, write, overwrite=overwrite)
    except FileExistsError:
        raise CLIError(f"{path} exists; pass --overwrite to replace it") from None


def _save_png(array: np.ndarray) -> Callable[[BinaryIO], None]:
    from PIL import Image

    def write(file: BinaryIO) -> None:
        Image.fromarray(array).save(file, format="PNG")

    return write


def _save_tiff(array: np.ndarray) -> Callable[[BinaryIO], None]:
    import tifffile

    def write(file: BinaryIO) -> None:
        tifffile.imwrite(file, array, photometric="minisblack", compression="zlib")

    return write


# --------------------------------------------------------------------------- commands


def _load_weights(name_or_path: str | None) -> Any:
    """A ``LoadedModel`` for a registry name or file (default: the default model)."""
    try:
        from . import weights
    except ImportError as err:
        raise CLIError(f"the weights module is not available ({err})") from err
    name = name_or_path or weights.DEFAULT_MODEL
    try:
        return weights.load_model(name)
    except weights.WeightsError as err:
        raise CLIError(str(err)) from err
    except OSError as err:
        raise CLIError(f"cannot load weights {name}: {err}") from err


def segment_file(
    image_path: str | os.PathLike[str],
    *,
    weights: str | None = None,
    out_dir: str | os.PathLike[str] = ".",
    sizing: str = "resize",
    device: str = "auto",
    backend: str = "auto",
    threshold: float = 0.5,
    output: str = "semantic",
    axes: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Segment one image file and write its mask (and, for 2D, an overlay).

    Args:
        image_path: The image file (see :func:`read_image`).
        weights: Registry name or ``.safetensors`` file; ``None``: the default model.
        out_dir: Folder for the outputs; created if missing.
        sizing: ``"resize"`` or ``"tiles"`` (see ``Segmenter.segment``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
        backend: ``"auto"``, ``"onnxruntime"``, ``"torch"``.
        threshold: Foreground probability threshold (binary models).
        output: ``"semantic"`` or ``"instances"``.
        axes: The image's axes (``T Z Y X C``), ``None`` to infer.
        overwrite: Replace existing output files.

    Returns:
        The files written: the mask, then the overlay (2D images only).

    Raises:
        CLIError: For a missing or unreadable image, unusable weights, a bad option or
            image (the engine's ``ValueError``), or an output file that exists.
    """
    from .inference import Segmenter, infer_axes

    image_path = Path(image_path)
    image = read_image(image_path)
    try:
        axes = axes.upper() if axes is not None else infer_axes(image.shape)
    except ValueError as err:
        raise CLIError(f"{image_path}: {err}") from err
    out = Path(out_dir)
    stem = image_path.stem
    is_2d = len(axes.replace("C", "")) == 2
    targets = (
        [out / f"{stem}_mask.png", out / f"{stem}_overlay.png"]
        if is_2d
        else [out / f"{stem}_mask.tif"]
    )
    # Checked before any work, and again when each file is moved into place.
    for path in targets:
        if path.exists() and not overwrite:
            raise CLIError(f"{path} exists; pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create the output folder {out}: {err}") from err
    loaded = _load_weights(weights)
    try:
        segmenter = Segmenter(loaded, device=device, backend=backend)  # type: ignore[arg-type]
        labels = segmenter.segment(
            image,
            axes=axes,
            sizing=sizing,  # type: ignore[arg-type]
            threshold=threshold,
            output=output,  # type: ignore[arg-type]
        )
    except ValueError as err:
        raise CLIError(f"{image_path}: {err}") from err
    mask = _mask_for_file(labels, segmenter.num_classes == 1, output == "semantic")
    if is_2d:
        mask_path, overlay_path = targets
        _write_atomic(mask_path, _save_png(mask), overwrite)
        # The overlay draws on the image channel-last, whatever its axes.
        frame = np.moveaxis(image, axes.index("C"), -1) if "C" in axes else image
        _write_atomic(overlay_path, _save_png(_overlay(frame, labels)), overwrite)
    else:
        _write_atomic(targets[0], _save_tiff(mask), overwrite)
    logger.info(
        "%s: %s on %s, %d foreground pixels",
        image_path.name,
        segmenter.backend,
        segmenter.device,
        int((labels > 0).sum()),
    )
    return targets


def open_viewer(
    image_path: str | os.PathLike[str] | None = None,
    *,
    weights: str | None = None,
    show: bool = True,
) -> Any:
    """Open napari with an image and the LV-UNet dock widget.

    Args:
        image_path: The image to open; ``None``: the plugin's sample polyp image (with
            its ground truth as a hidden Labels layer).
        weights: A ``.safetensors`` file to add to the widget's model list and select.
        show: Show the window (``False`` for tests).

    Returns:
        The ``napari.Viewer``.

    Raises:
        CLIError: For a missing or unreadable image.
    """
    image = read_image(image_path) if image_path is not None else None
    import napari

    viewer = napari.Viewer(show=show)
    if image is None:
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
        choices=("resize", "tiles"),
        default="resize",
        help="resize to the training size (default) or native-resolution tiles",
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="LV-UNet segmentation: headless, or in napari."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    seg = commands.add_parser("segment", help="segment an image file, write mask + overlay PNGs")
    seg.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, TIFF, ...)")
    _add_segment_options(seg)
    view = commands.add_parser(
        "view", help="open napari with an image (default: the sample) and the LV-UNet widget"
    )
    view.add_argument("image", nargs="?", metavar="IMAGE", help="image file (default: sample)")
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
        The exit status: 0 on success, 1 on an error (reported on stderr), 2 on bad usage.
    """
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("napari_lvunet")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "view" and not args.headless and _has_display():
            viewer = open_viewer(args.image, weights=args.weights)
            import napari

            napari.run()
            del viewer
            return 0
        image = args.image if args.image is not None else sample_image_path()
        if args.command == "view" and not args.headless:
            print(f"{_PROG}: no display found, running `segment` on {image} instead")
        written = segment_file(
            image,
            weights=args.weights,
            out_dir=args.out,
            sizing=args.sizing,
            device=args.device,
            backend=args.backend,
            threshold=args.threshold,
            output=args.output,
            axes=args.axes,
            overwrite=args.overwrite,
        )
    except CLIError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
    for path in written:
        print(f"wrote {path}")
    return 0
