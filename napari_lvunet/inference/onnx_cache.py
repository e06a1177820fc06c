"""The ONNX graphs ONNX Runtime runs: shipped with registry models, or made once per model.

Every graph is checked against a recorded SHA-256 before a session is built on it, so a
damaged file is never run (a few flipped bytes in a weight can parse fine and silently
lose every foreground pixel):

* a registry model's graph against the sha256 in the registry; a mismatch is refused
  (reinstall or re-download);
* a graph made for a user's own weights against the sha256 in its own file name
  ``lvunet-<tensors sha256 prefix>.v<version>.<graph sha256>.onnx``; a mismatch is
  deleted and made again.

Graphs are made in a child process (``python -m napari_lvunet.export``), so the napari
process never imports PyTorch, and land in the user cache folder
(``$NAPARI_LVUNET_CACHE/onnx``), never beside the weights: an installed package may be
read-only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .._torch import TRAIN_INSTALL, MissingTorchError, torch_installed
from ..weights import WeightsError, cache_dir, file_sha256

if TYPE_CHECKING:
    from .source import ModelSource

__all__ = ["CACHE_VERSION", "cache_folder", "graph_for"]

logger = logging.getLogger(__name__)

#: Bumped whenever the exported graph changes, so that stale cached graphs are never used.
CACHE_VERSION = 4
# Longest an export may take in the child process (about 15 s on a 2-core CPU).
_EXPORT_TIMEOUT_S = 600


def cache_folder(folder: str | os.PathLike[str] | None = None) -> Path:
    """``folder``, or ``<weights cache>/onnx`` (see :func:`napari_lvunet.weights.cache_dir`)."""
    return Path(folder) if folder is not None else cache_dir() / "onnx"


def _stem(key: str) -> str:
    return f"lvunet-{key[:32]}.v{CACHE_VERSION}"


def graph_for(source: ModelSource, folder: str | os.PathLike[str] | None = None) -> Path:
    """A verified ONNX graph for ``source``, made (once) if there is none.

    Raises:
        WeightsError: If a registry model's shipped graph is damaged.
        napari_lvunet._torch.MissingTorchError: If a graph must be made and PyTorch is
            not installed.
        RuntimeError: If making the graph failed (the child's message included).
    """
    info = source.info
    if info is not None and info.onnx_path is not None:
        if file_sha256(info.onnx_path) != (info.onnx_sha256 or "").lower():
            raise WeightsError(
                f"the ONNX graph of model {info.name!r} ({info.onnx_path}) does not match its "
                "registered sha256: the file is damaged and was not used; reinstall "
                "napari-lvunet (or delete the file from the download cache)"
            )
        return info.onnx_path
    target = cache_folder(folder)
    found = _cached(target, source.key)
    if found is not None:
        return found
    return _make(source, target)


def _cached(folder: Path, key: str) -> Path | None:
    """The verified cached graph for ``key``; damaged ones are deleted with a warning."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob(f"{_stem(key)}.*.onnx")):
        recorded = path.name[len(_stem(key)) + 1 : -len(".onnx")]
        try:
            actual = file_sha256(path)
        except OSError as err:
            logger.warning("cannot read cached ONNX graph %s: %s", path, err)
            continue
        if actual == recorded:
            return path
        warnings.warn(
            f"the cached ONNX graph {path} is damaged (its sha256 differs from the one "
            "recorded when it was made); it was deleted and will be made again",
            RuntimeWarning,
            4,
        )
        path.unlink(missing_ok=True)
    return None


def _make(source: ModelSource, folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the ONNX cache folder {folder}: {err}") from err
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".onnx.tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if source.has_torch_model:  # torch is already loaded here: export in-process
            from ..export import export_onnx

            export_onnx(
                source.torch_model(),
                tmp,
                include_normalization=True,
                metadata={"tensors_sha256": source.key},
            )
        else:
            _export_in_child(source, tmp)
        digest = file_sha256(tmp)
        final = folder / f"{_stem(source.key)}.{digest}.onnx"
        os.replace(tmp, final)
        logger.info("made the ONNX graph %s", final)
        return final
    finally:
        tmp.unlink(missing_ok=True)


def _export_in_child(source: ModelSource, out: Path) -> None:
    assert source.info is not None
    if not torch_installed():
        raise MissingTorchError(
            f"the weights {source.info.path} have no ONNX graph yet; making one (once per "
            f"model) needs PyTorch, which is not installed here: {TRAIN_INSTALL}"
        )
    command = [sys.executable, "-m", "napari_lvunet.export", str(source.info.path), str(out)]
    logger.info("making an ONNX graph for %s in a child process", source.info.path)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_EXPORT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"making the ONNX graph took over {_EXPORT_TIMEOUT_S} s") from err
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        detail = lines[-1] if lines else f"exit code {done.returncode}"
        raise RuntimeError(f"could not make the ONNX graph for {source.info.path}: {detail}")
