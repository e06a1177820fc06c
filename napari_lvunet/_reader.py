"""napari reader contribution: videos (.mp4, .avi, .mov, .mkv) as lazy RGB image layers.

napari cannot open a video by itself. This reader gives it a :class:`~napari_lvunet.video.Video`
(frames decoded on demand), so a long recording opens at once and scrubbing decodes only
the frames shown. The layer is ``T x H x W x 3`` with ``rgb=True``; its metadata holds the
frame rate, each frame's time and the file, which the video export reuses.

Existing napari video readers were considered: ``napari-video`` reads through OpenCV (a
large extra dependency whose frame seeking is approximate), ``napari-pyav`` is an early
0.1 release; neither gives the frame times the per-frame CSV needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .video import is_video, open_video

__all__ = ["get_reader", "read_video"]

LayerDataTuple = tuple[Any, dict[str, Any], str]
PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerDataTuple]] | None:
    """napari's reader hook: :func:`read_video` if every path is a video, else ``None``.

    Args:
        path: One path, or several (napari passes a list when files are dropped together).

    Returns:
        The reader function, or ``None`` to let another reader try.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(is_video(p) for p in paths):
        return None
    return read_video


def read_video(path: PathOrPaths) -> list[LayerDataTuple]:
    """One lazy RGB image layer per video.

    Args:
        path: A video file, or several.

    Returns:
        napari layer-data tuples ``(video, {"name", "rgb": True, "metadata"}, "image")``;
        metadata: ``fps``, ``frame_times`` (seconds, one per frame) and ``path``.

    Raises:
        napari_lvunet.video.VideoError: For a file that cannot be opened as a video
            (napari shows the message).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerDataTuple] = []
    for one in paths:
        video = open_video(one)
        metadata = {"fps": video.fps, "frame_times": video.frame_times, "path": str(video.path)}
        layers.append((video, {"name": Path(one).stem, "rgb": True, "metadata": metadata}, "image"))
    return layers
