"""napari sample data: Kvasir-SEG polyp frames from the test split, with their masks.

The files live in ``sample_data/`` (a copy of the top-level folder inside the installed
package), beside the dataset's attribution and licence note. They come from the test split
so that what a new user first segments was never seen in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io import read_image

__all__ = ["SAMPLE_DIR", "polyp", "polyp_stack", "polyp_video"]

#: Folder holding the sample files inside the installed package.
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"

_POLYP_ID = "cju2hw5gjlr5h0988so2qqres"
_ATTRIBUTION = "Kvasir-SEG test split (Jha et al., MMM 2020); see sample_data/README.md"

LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]


def _read_mask(path: Path) -> np.ndarray:
    return (read_image(path, mask=True) > 0).astype(np.uint8)


def polyp() -> list[LayerDataTuple]:
    """One colonoscopy frame and its ground-truth polyp mask.

    Returns:
        Two napari layer-data tuples: the RGB image (``"polyp"``) and the mask as a Labels
        layer (``"polyp ground truth"``, hidden so the model's result is what one sees).
    """
    image = read_image(SAMPLE_DIR / f"kvasir_{_POLYP_ID}.jpg")
    mask = _read_mask(SAMPLE_DIR / f"kvasir_{_POLYP_ID}_mask.png")
    meta = {"source": _ATTRIBUTION, "id": _POLYP_ID}
    return [
        (image, {"name": "polyp", "rgb": True, "metadata": meta}, "image"),
        (mask, {"name": "polyp ground truth", "visible": False, "metadata": meta}, "labels"),
    ]


def polyp_stack() -> list[LayerDataTuple]:
    """Five test-split frames resized to 256 x 320 and stacked, with their masks.

    Returns:
        Two napari layer-data tuples: the ``(5, 256, 320, 3)`` RGB stack (``"polyp stack"``)
        and the ``(5, 256, 320)`` ground truth as a hidden Labels layer.
    """
    stack = read_image(SAMPLE_DIR / "kvasir_stack5.tif")
    masks = read_image(SAMPLE_DIR / "kvasir_stack5_masks.tif").astype(np.uint8)
    meta = {"source": _ATTRIBUTION}
    return [
        (stack, {"name": "polyp stack", "rgb": True, "metadata": meta}, "image"),
        (
            masks,
            {"name": "polyp stack ground truth", "visible": False, "metadata": meta},
            "labels",
        ),
    ]


def polyp_video() -> list[LayerDataTuple]:
    """A 4-second, 25 fps colonoscopy-like video (pan and zoom over three test frames).

    Returns:
        Two napari layer-data tuples: the lazy ``(100, 360, 448, 3)`` RGB video
        (``"polyp video"``, decoded frame by frame; its metadata holds the frame rate) and
        the ground truth moved the same way, ``(100, 360, 448)``, as a hidden Labels layer.
    """
    from ._reader import read_video

    ((video, kwargs, kind),) = read_video(SAMPLE_DIR / "kvasir_video.mp4")
    kwargs["name"] = "polyp video"
    kwargs["metadata"]["source"] = _ATTRIBUTION
    masks = read_image(SAMPLE_DIR / "kvasir_video_masks.tif").astype(np.uint8)
    meta = {"source": _ATTRIBUTION}
    return [
        (video, kwargs, kind),
        (
            masks,
            {"name": "polyp video ground truth", "visible": False, "metadata": meta},
            "labels",
        ),
    ]
