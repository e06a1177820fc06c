"""Fused LV-UNet weights: the file format, the model registry, downloads and loading.

A weights file is a ``.safetensors`` file holding the *fused* state dict (the deployment
form of :func:`napari_lvunet.model.reparameterize_model`) and one JSON string under the
metadata key ``"napari_lvunet"``::

    {"format": "napari-lvunet", "format_version": 1,
     "architecture": {"num_classes": 1, "act_num": 1, "fused": true, "in_chans": 3},
     "act_learn": 1.0, "train_size": [256, 256],
     "normalization": {"mean": [...], "std": [...]},
     "tensors_sha256": "<hash of every tensor's name, shape and bytes>",
     "code_version": "0.1.0+g1234abc", ... the caller's: dataset, split, metrics ...}

safetensors holds only tensors and strings, so opening a file never runs code (a
PyTorch ``.pt`` pickle can). ``tensors_sha256`` lets a file loaded from disk prove that
its values are the ones that were written, even without a registry hash.

Registry models are fetched with pooch into :func:`cache_dir` and checked against their
sha256; the default model ships inside the package (``napari_lvunet/_weights``) so that
segmentation works offline on first use. Every registry model also ships its ONNX graph
(normalisation inside, the form ONNX Runtime runs on the CPU) with its own sha256, so CPU
inference needs no PyTorch and no export. Every rejection raises :class:`WeightsError`
with a message that names the file and the problem, and a rejected file is never used.

Two readers share every check: :func:`open_weights` (no PyTorch: hash, metadata bounds,
tensor names, shapes and values from the safetensors header and numpy) for CPU inference,
and :func:`load_model` (builds the PyTorch model) for GPU inference and training. Metadata
fields are bounded and the declared architecture is compared with the tensor headers before
anything is built, so a crafted file cannot make either allocate memory it names.

Environment variables:
    ``NAPARI_LVUNET_CACHE``: folder for downloaded weights (default
    ``pooch.os_cache("napari-lvunet")``).
    ``NAPARI_LVUNET_BASE_URL``: where registry files are downloaded from (the URL of a
    folder; each file is ``<base URL>/<filename>``). There is no public default yet.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pooch

from .io import atomic_write
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, SIZE_DIVISOR, TRAIN_SIZE

if TYPE_CHECKING:
    from .model import LVUNet

__all__ = [
    "BASE_URL_ENV",
    "CACHE_ENV",
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "LoadedModel",
    "ModelEntry",
    "WeightsError",
    "WeightsFile",
    "base_url",
    "bundled_dir",
    "cache_dir",
    "code_version",
    "fetch_graph",
    "fetch_weights",
    "file_sha256",
    "file_tensors",
    "is_available_offline",
    "load_model",
    "open_weights",
    "read_metadata",
    "registry",
    "save_weights",
    "tensors_sha256",
]

logger = logging.getLogger(__name__)

#: Version of the metadata layout; files from a newer version are refused, not guessed at.
FORMAT_VERSION = 1
#: Registry name of the model the widget selects first.
DEFAULT_MODEL = "lvunet-kvasir-seg"

#: Environment variables naming the download cache folder and the download location.
CACHE_ENV = "NAPARI_LVUNET_CACHE"
BASE_URL_ENV = "NAPARI_LVUNET_BASE_URL"
#: No public hosting exists yet; non-bundled entries need NAPARI_LVUNET_BASE_URL.
_DEFAULT_BASE_URL = ""

_METADATA_KEY = "napari_lvunet"
_FORMAT_NAME = "napari-lvunet"
# Keys that save_weights derives from the model itself; a caller may not override them.
_RESERVED_KEYS = frozenset(
    {"format", "format_version", "architecture", "act_learn", "normalization", "tensors_sha256"}
)
_ARCH_KEYS = frozenset({"num_classes", "act_num", "fused", "in_chans"})
# A fused LV-UNet file is about 2 MB; anything this large is not a weights file,
# and reading it whole into memory would only stall napari.
_MAX_FILE_BYTES = 256 * 1024**2
# A fused LV-UNet header is about 10 kB, with metadata; safetensors' own limit is 100 MB.
_MAX_HEADER_BYTES = 16 * 1024**2
# Bounds on what metadata may declare: checked before anything is built or allocated.
_MAX_CLASSES = 256
_MAX_ACT_NUM = 8
_MAX_TRAIN_SIDE = 4096
_MAX_SOURCE_SIDE = 65536
_MAX_JSON_DEPTH = 32
_PICKLE_HINT = (
    "napari-lvunet only opens .safetensors weights: unpickling a PyTorch checkpoint can run "
    "arbitrary code. Export fused weights with `python -m training.export` and open the "
    ".safetensors file it writes."
)


class WeightsError(RuntimeError):
    """A weights file or registry model that cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelEntry:
    """One model in the registry.

    Attributes:
        name: Registry name shown in the model picker.
        filename: File name in the package's ``_weights`` folder (bundled) or under the
            download base URL and in the cache.
        sha256: Hex SHA-256 of the file's bytes; a download that differs is rejected.
        description: One line for people choosing a model.
        bundled: Shipped inside ``napari_lvunet/_weights`` (available offline).
        meta: Dataset, resolution, metrics, licence, ...
        onnx_filename: The model's ONNX graph (normalisation inside), beside ``filename``.
        onnx_sha256: Hex SHA-256 of the graph; a graph that differs is never run.
    """

    name: str
    filename: str
    sha256: str
    description: str
    bundled: bool = False
    onnx_filename: str | None = None
    onnx_sha256: str | None = None
    # hash=False: a mapping is unhashable, and the name and file identify an entry.
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)


@dataclass(frozen=True)
class WeightsFile:
    """A checked weights file, without PyTorch: what CPU inference needs.

    Attributes:
        name: Registry name, or the file's stem for a file opened by path.
        path: The ``.safetensors`` file.
        sha256: Hex SHA-256 of its bytes.
        metadata: Its metadata (see the module docstring).
        onnx_path: The registry's verified ONNX graph for these weights, or ``None``
            (the engine then exports one into the user cache).
        onnx_sha256: The registered sha256 of ``onnx_path``, checked again before every
            ONNX Runtime session is built.
    """

    name: str
    path: Path
    sha256: str
    metadata: Mapping[str, Any]
    onnx_path: Path | None = None
    onnx_sha256: str | None = None

    @property
    def tensors_sha256(self) -> str:
        """The hash of the tensors (what ONNX graphs are keyed by)."""
        return str(self.metadata["tensors_sha256"])

    @property
    def train_size(self) -> tuple[int, int]:
        """The (height, width) the model was trained at."""
        height, width = self.metadata["train_size"]
        return int(height), int(width)


@dataclass
class LoadedModel:
    """A fused model ready for inference, with where it came from.

    Attributes:
        model: The fused LV-UNet, in eval mode, on the CPU.
        metadata: The file's metadata (see the module docstring).
        sha256: Hex SHA-256 of the file's bytes.
        path: The file the weights were read from.
        name: Registry name, or the file's stem for a file loaded by path.
    """

    model: LVUNet
    metadata: dict[str, Any]
    sha256: str
    path: Path
    name: str

    @property
    def train_size(self) -> tuple[int, int]:
        """The (height, width) the model was trained at."""
        height, width = self.metadata["train_size"]
        return int(height), int(width)


# Models known to the plugin. The default model's fused weights are added here (bundled)
# by the training run that produces them: file in napari_lvunet/_weights, sha256 from
# file_sha256(), meta with dataset, split, resolution, test metrics and licence.
_ENTRIES: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="lvunet-kvasir-seg",
        filename="lvunet-kvasir-seg.safetensors",
        sha256="ca5c83c4bf5edbb6881893bc381cdc10e78be24202cf40796463f2bd57351f54",
        description="LV-UNet trained on Kvasir-SEG polyps, 256x256 (docs/MODEL_CARD.md)",
        bundled=True,
        onnx_filename="lvunet-kvasir-seg.onnx",
        onnx_sha256="10bc0bfd56cb8b65068bcf6f5dec33f5e2675040110548e7fb83a09eb611ed3d",
        meta=MappingProxyType(
            {
                "dataset": "Kvasir-SEG (Jha et al., MMM 2020)",
                "split": "splits.json: trained on train (640), selected on val (160)",
                "resolution": (256, 256),
                "metrics": MappingProxyType({"test_dice": 0.8734, "test_iou": 0.7994}),
                "licence": "weights derive from Kvasir-SEG: research and educational use; "
                "commercial use needs the dataset authors' permission",
            }
        ),
    ),
)


def registry() -> dict[str, ModelEntry]:
    """Return the known models by name (a fresh dict; changing it changes nothing)."""
    return {entry.name: entry for entry in _ENTRIES}


def cache_dir() -> Path:
    """Return the folder downloaded weights are cached in.

    ``$NAPARI_LVUNET_CACHE`` if set, else ``pooch.os_cache("napari-lvunet")`` (for
    example ``~/.cache/napari-lvunet`` on Linux).
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path(pooch.os_cache("napari-lvunet"))


def base_url() -> str:
    """Return the URL of the folder registry files are downloaded from.

    ``$NAPARI_LVUNET_BASE_URL`` if set, else the project's default, which is empty: no
    public hosting exists yet, so downloads need the environment variable.
    """
    return os.environ.get(BASE_URL_ENV, "").strip() or _DEFAULT_BASE_URL


def bundled_dir() -> Path:
    """Return the package folder that holds the bundled weights files."""
    return Path(__file__).resolve().parent / "_weights"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Return the package version, plus the git commit when run from a git checkout.

    For example ``"0.1.0+g39db22f"``, with ``".dirty"`` appended when tracked files have
    uncommitted changes. Never fails: without git, or outside a checkout, it is the
    package version alone.
    """
    from . import __version__  # late: this module may be imported by the package itself

    repo = Path(__file__).resolve().parent.parent
    # Only ask git about our own checkout, never about whatever folder an installed
    # package happens to sit in.
    if not (repo / ".git").exists():
        return __version__
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not commit:
        return __version__
    return f"{__version__}+g{commit}" + (".dirty" if status else "")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file's bytes (what registry entries pin).

    Raises:
        OSError: If the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_by_stat(path: str, inode: int, size: int, mtime_ns: int) -> str:
    # Keyed by inode, size and mtime so that the model picker can ask repeatedly without
    # re-reading files, while a replaced (new inode) or edited file is hashed again.
    return file_sha256(path)


def _has_hash(path: Path, sha256: str) -> bool:
    try:
        if not path.is_file():
            return False
        stat = path.stat()
        return (
            _sha256_by_stat(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
            == sha256.lower()
        )
    except OSError:
        return False


def _registry_or_default(
    models: Mapping[str, ModelEntry] | None,
) -> Mapping[str, ModelEntry]:
    return registry() if models is None else models


def _entry(name: str, models: Mapping[str, ModelEntry]) -> ModelEntry:
    try:
        return models[name]
    except KeyError:
        known = ", ".join(sorted(models)) or "none"
        raise WeightsError(
            f"unknown model {name!r} (registered models: {known}); to use your own weights "
            "give the path of a .safetensors file"
        ) from None


def is_available_offline(name: str, *, registry: Mapping[str, ModelEntry] | None = None) -> bool:
    """Whether a registry model can be loaded without a network connection.

    Args:
        name: Registry name.
        registry: Models to look ``name`` up in (default: :func:`registry`).

    Returns:
        True if the model is bundled with the package, or already downloaded into
        :func:`cache_dir` with the registered hash.

    Raises:
        WeightsError: If ``name`` is not in the registry.
    """
    models = _registry_or_default(registry)
    entry = _entry(name, models)
    folder = bundled_dir() if entry.bundled else cache_dir()
    return _has_hash(folder / entry.filename, entry.sha256)


def fetch_weights(
    name: str,
    *,
    progressbar: bool | Any = True,
    registry: Mapping[str, ModelEntry] | None = None,
) -> Path:
    """Return the local path of a registry model's file, downloading it if needed.

    Bundled files are checked in place; other files are downloaded with pooch from
    :func:`base_url` into :func:`cache_dir` on first use. A download whose SHA-256 differs
    from the registry's is deleted, never used.

    Args:
        name: Registry name.
        progressbar: True for a tqdm progress bar on stderr, False for none, or a
            tqdm-like object (``total``, ``update``, ``reset``, ``close``; napari's
            ``progress`` works) to report the download to.
        registry: Models to look ``name`` up in (default: :func:`registry`).

    Returns:
        Path of the verified file.

    Raises:
        WeightsError: Unknown name, bundled file missing or damaged, no download location
            configured, the machine is offline, the server has no such file, or the
            download's hash does not match.
    """
    entry = _entry(name, _registry_or_default(registry))
    return _fetch_file(entry, entry.filename, entry.sha256, progressbar, "weights")


def fetch_graph(
    name: str,
    *,
    progressbar: bool | Any = True,
    registry: Mapping[str, ModelEntry] | None = None,
) -> Path | None:
    """Return the local path of a registry model's verified ONNX graph, if it has one.

    Fetched and checked exactly as :func:`fetch_weights` does the weights.

    Raises:
        WeightsError: As :func:`fetch_weights`.
    """
    entry = _entry(name, _registry_or_default(registry))
    if entry.onnx_filename is None or entry.onnx_sha256 is None:
        return None
    return _fetch_file(entry, entry.onnx_filename, entry.onnx_sha256, progressbar, "ONNX graph")


def _fetch_file(
    entry: ModelEntry, filename: str, sha256: str, progressbar: bool | Any, what: str
) -> Path:
    name = entry.name
    if entry.bundled:
        path = bundled_dir() / filename
        if not path.is_file():
            raise WeightsError(
                f"the bundled {what} of model {name!r} is missing ({path}): the "
                "napari-lvunet installation is incomplete; reinstall it"
            )
        if not _has_hash(path, sha256):
            raise WeightsError(
                f"the bundled {what} of model {name!r} ({path}) does not match its "
                "registered sha256: the file is damaged and was not used; reinstall "
                "napari-lvunet"
            )
        return path

    folder = cache_dir()
    cached = folder / filename
    if _has_hash(cached, sha256):
        return cached
    url_base = base_url()
    if not url_base:
        raise WeightsError(
            f"model {name!r} is not downloaded yet and no download location is configured: "
            f"set the environment variable {BASE_URL_ENV} to the URL of the folder that "
            f"holds {filename}, or copy {filename} into {folder}, or open a "
            "weights file with 'Load weights from file...'"
        )
    fetcher = pooch.create(
        path=folder, base_url=url_base, registry={filename: f"sha256:{sha256.lower()}"}
    )
    url = fetcher.get_url(filename)
    try:
        path = Path(fetcher.fetch(filename, progressbar=progressbar))
    except Exception as err:
        raise _download_error(err, name, filename, sha256, url, folder) from err
    _make_readable(path)
    return path


def _make_readable(path: Path) -> None:
    """Downloads land from a private temporary file (mode 0600); a shared cache needs the
    usual permissions (0644 under the usual umask)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        path.chmod(0o666 & ~umask)
    except OSError as err:  # a cache on a filesystem without modes: harmless
        logger.debug("could not set the mode of %s: %s", path, err)


def _download_error(
    err: Exception, name: str, filename: str, sha256: str, url: str, folder: Path
) -> WeightsError:
    """Translate what pooch / requests raised into a message for the user."""
    import requests  # pooch depends on it; imported here as only failures need it

    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 404:
            return WeightsError(
                f"model {name!r}: {filename} was not found at {url} (HTTP 404); "
                f"check {BASE_URL_ENV}, or open a weights file with 'Load weights from file...'"
            )
        return WeightsError(
            f"model {name!r}: the server answered HTTP {status} for {url}; try again later, "
            "or open a weights file with 'Load weights from file...'"
        )
    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return WeightsError(
            f"model {name!r} could not be downloaded from {url}: this machine appears to be "
            f"offline (or the server is unreachable: {type(err).__name__}). Connect to the "
            f"network once (the file is then cached), or copy {filename} "
            f"(sha256 {sha256}) into {folder}, or open a weights file with "
            "'Load weights from file...'"
        )
    if isinstance(err, requests.RequestException):
        return WeightsError(f"model {name!r}: download from {url} failed: {err}")
    if isinstance(err, ValueError) and "hash" in str(err).lower():
        return WeightsError(
            f"model {name!r}: the file downloaded from {url} does not match the registered "
            f"sha256 {sha256}; it was rejected and deleted, never used. The server may "
            "hold a different or damaged file."
        )
    if isinstance(err, OSError):
        return WeightsError(f"model {name!r}: could not store the download in {folder}: {err}")
    return WeightsError(f"model {name!r}: download from {url} failed: {err}")


def _json_default(value: Any) -> Any:
    # numpy and torch scalars carry .item(); paths are common in training configs.
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """Hex SHA-256 over named tensors: each name, dtype, shape and bytes, in name order.

    The digest a weights file stores as ``tensors_sha256``; it does not depend on the
    file's layout or metadata, only on the tensors.

    Args:
        tensors: Torch tensors (a state dict; moved to the CPU to be hashed) or numpy
            arrays by name. Both give the same digest for the same values: the dtype is
            hashed under torch's name (``torch.float32``) either way.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            dtype = f"torch.{array.dtype.name}"
        else:  # a torch tensor
            value = value.detach().to("cpu").contiguous()
            dtype, array = str(value.dtype), value.numpy()
        header = f"{key}\0{dtype}\0{tuple(array.shape)}\0".encode()
        digest.update(header)
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def file_tensors(fused: LVUNet) -> dict[str, Any]:
    """The tensors a weights file holds for a fused model: float32, on the CPU, by name.

    Their :func:`tensors_sha256` is the ``tensors_sha256`` that :func:`save_weights`
    records, so a model can be matched against a file without writing one.
    """
    import torch

    return {
        key: value.detach().to("cpu", torch.float32).contiguous()
        for key, value in fused.state_dict().items()
    }


def save_weights(
    model: LVUNet,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a model's fused weights and metadata as a ``.safetensors`` file.

    An unfused model is fused with :func:`reparameterize_model` (a copy; ``model`` is
    untouched). The file is written to a temporary name in the same folder and moved into
    place in one step, so a crash never leaves a half-written file under ``path``.

    Args:
        model: An LV-UNet, fused or at ``act_learn == 1``.
        path: Destination; must end in ``.safetensors``. Missing folders are created.
        metadata: JSON-serialisable facts about the weights, stored as given: dataset,
            split, metrics, training config ... ``train_size`` (default the preprocessing's
            ``TRAIN_SIZE``) and ``code_version`` (default :func:`code_version`) may be
            given; the architecture, ``act_learn``, normalisation and format keys are
            derived from the model and may not.
        overwrite: Replace an existing file at ``path``.

    Returns:
        The path written.

    Raises:
        ValueError: If ``path`` does not end in ``.safetensors``, the model is unfused at
            ``act_learn != 1`` (fusion would change its outputs), or ``metadata`` sets a
            reserved key, an invalid ``train_size``, or is not JSON-serialisable.
        TypeError: If ``model`` is not an :class:`LVUNet`.
        FileExistsError: If ``path`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save as save_safetensors_bytes

    from .model import LVUNet, reparameterize_model

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weights files end in .safetensors, got {path.name!r}")
    if not isinstance(model, LVUNet):
        raise TypeError(f"expected an LVUNet, got {type(model).__name__}")
    reserved = sorted(_RESERVED_KEYS & set(metadata))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are derived from the model; do not pass them")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")

    fused = model if model.fused else reparameterize_model(model)  # ValueError if act_learn<1
    tensors = file_tensors(fused)
    meta: dict[str, Any] = {
        "train_size": list(TRAIN_SIZE),
        "code_version": code_version(),
        **metadata,
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": {**fused.config, "fused": True, "in_chans": 3},
        "act_learn": 1.0,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "tensors_sha256": tensors_sha256(tensors),
    }
    try:
        text = json.dumps(meta, default=_json_default, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-serialisable (no NaN or infinity): {err}") from err
    try:  # checked before writing: a bad train_size would make an unloadable file
        _check_metadata(json.loads(text), path)
    except WeightsError as err:
        raise ValueError(str(err)) from err
    data = save_safetensors_bytes(tensors, metadata={_METADATA_KEY: text})

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: file.write(data), overwrite=overwrite)
    logger.info(
        "saved fused LV-UNet weights to %s (sha256 %s)", path, hashlib.sha256(data).hexdigest()
    )
    return path


def _describe_pickle(head: bytes) -> str | None:
    """Name the PyTorch checkpoint formats people most often pick by mistake."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, which is how torch.save writes PyTorch (.pt/.pth) checkpoints"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a PyTorch checkpoint)"
    return None


def _parse_header(head: bytes, file_size: int, path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header.

    ``head`` is the file's start, at least up to the end of the header when the file is
    that long; ``file_size`` is the whole file's length, to detect truncation.
    """
    kind = _describe_pickle(head[:8])
    if kind is not None:
        raise WeightsError(f"{path} is not a safetensors file: it is {kind}. {_PICKLE_HINT}")
    not_weights = (
        f"{path} is not a safetensors weights file; napari-lvunet opens the .safetensors "
        "files written by `python -m training.export`"
    )
    if file_size < 8:
        raise WeightsError(f"{not_weights} (only {file_size} bytes: empty or truncated)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER_BYTES or head[8:9] not in (b"{", b""):
        raise WeightsError(not_weights)
    if 8 + header_len > file_size:
        raise WeightsError(f"{path} is truncated: its header is incomplete")
    try:
        header = json.loads(head[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(
            f"{path} is corrupted: its safetensors header is unreadable ({err})"
        ) from err
    except RecursionError:
        raise WeightsError(f"{path} is corrupted: its header is nested too deeply") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is corrupted: its safetensors header is not a JSON object")
    try:
        end = max(
            (int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError) as err:
        raise WeightsError(f"{path} is corrupted: malformed tensor entry in its header") from err
    if 8 + header_len + end > file_size:
        raise WeightsError(
            f"{path} is truncated: {file_size} bytes, its header describes {8 + header_len + end}"
        )
    return header


def _metadata_from_header(header: Mapping[str, Any], path: Path) -> dict[str, Any]:
    strings = header.get("__metadata__")  # safetensors: a str -> str map, if well formed
    raw = strings.get(_METADATA_KEY) if isinstance(strings, dict) else None
    if raw is None:
        raise WeightsError(
            f"{path} has no napari-lvunet metadata: it was not written by napari-lvunet "
            "(export weights with `python -m training.export` or napari_lvunet.weights."
            "save_weights)"
        )
    if not isinstance(raw, str) or len(raw) > _MAX_HEADER_BYTES:
        raise WeightsError(f"{path}: its napari-lvunet metadata is not a JSON string")
    try:
        metadata = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: its napari-lvunet metadata is not valid JSON ({err})") from err
    except RecursionError:
        raise WeightsError(f"{path}: its napari-lvunet metadata is nested too deeply") from None
    _check_metadata(metadata, path)
    return metadata


def _is_positive_int(value: Any, most: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value > 0
        and (most is None or value <= most)
    )


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting no further than ``limit + 1``."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


def _numbers_close(values: Any, reference: tuple[float, ...]) -> bool:
    return (
        isinstance(values, list)
        and len(values) == len(reference)
        and all(
            isinstance(a, (int, float)) and math.isclose(a, b, abs_tol=1e-6)
            for a, b in zip(values, reference, strict=True)
        )
    )


def _check_metadata(metadata: Any, path: Path) -> None:
    """Raise WeightsError unless ``metadata`` describes fused LV-UNet weights we can run."""

    def bad(problem: str) -> WeightsError:
        return WeightsError(f"{path}: invalid napari-lvunet metadata: {problem}")

    if not isinstance(metadata, dict):
        raise bad("not a JSON object")
    if _depth(metadata, _MAX_JSON_DEPTH) > _MAX_JSON_DEPTH:
        raise bad(f"nested more than {_MAX_JSON_DEPTH} levels deep")
    if metadata.get("format") != _FORMAT_NAME:
        raise bad(f"format is {metadata.get('format')!r}, expected {_FORMAT_NAME!r}")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"format_version is {version!r}")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{path} was written by a newer napari-lvunet (weights format {version}; this "
            f"version reads format {FORMAT_VERSION}): update napari-lvunet"
        )
    arch = metadata.get("architecture")
    if not isinstance(arch, dict):
        raise bad("no architecture")
    unknown = sorted(set(arch) - _ARCH_KEYS)
    if unknown:
        raise bad(f"unknown architecture keys {unknown}")
    for key, most in (("num_classes", _MAX_CLASSES), ("act_num", _MAX_ACT_NUM)):
        value = arch.get(key)
        if not _is_positive_int(value, most):
            raise bad(f"architecture {key} is {value!r}, expected an integer from 1 to {most}")
    if arch.get("fused") is not True:
        raise bad("the weights are not fused (architecture fused must be true)")
    if arch.get("in_chans", 3) != 3:
        raise bad(f"in_chans is {arch.get('in_chans')!r}; LV-UNet takes 3-channel RGB input")
    if metadata.get("act_learn") != 1:
        raise bad(f"act_learn is {metadata.get('act_learn')!r}; fused weights are exact only at 1")
    size = metadata.get("train_size")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(_is_positive_int(side, _MAX_TRAIN_SIDE) for side in size)
    ):
        raise bad(f"train_size is {size!r}, expected [height, width] of at most {_MAX_TRAIN_SIDE}")
    if any(side % SIZE_DIVISOR for side in size):
        # Checked here, not first when a segmenter is built: a file that loads must run.
        raise bad(f"train_size is {size!r}; LV-UNet needs multiples of {SIZE_DIVISOR}")
    for key in ("source_size", "source_size_max"):
        source = metadata.get(key)
        if source is not None and not (
            isinstance(source, list)
            and len(source) == 2
            and all(_is_positive_int(side, _MAX_SOURCE_SIDE) for side in source)
        ):
            raise bad(
                f"{key} is {source!r}, expected [height, width] of at most {_MAX_SOURCE_SIDE}"
            )
    norm = metadata.get("normalization")
    if not (
        isinstance(norm, dict)
        and _numbers_close(norm.get("mean"), IMAGENET_MEAN)
        and _numbers_close(norm.get("std"), IMAGENET_STD)
    ):
        raise bad(
            f"normalization is {norm!r}; napari-lvunet's preprocessing uses the ImageNet "
            f"mean {list(IMAGENET_MEAN)} and std {list(IMAGENET_STD)}"
        )
    digest = metadata.get("tensors_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise bad("tensors_sha256 is missing")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a weights file's metadata without loading its tensors.

    Args:
        path: A ``.safetensors`` file written by :func:`save_weights`.

    Returns:
        The metadata dict (see the module docstring).

    Raises:
        WeightsError: If the file is missing, is not safetensors (a pickle is recognised
            and never unpickled), is truncated, or lacks valid napari-lvunet metadata.
    """
    path = Path(path)
    with _open_checked(path) as file:
        head = file.read(8)
        # An absurd header length is rejected by _parse_header without reading it.
        if len(head) == 8 and struct.unpack("<Q", head)[0] <= _MAX_HEADER_BYTES:
            head += file.read(struct.unpack("<Q", head)[0])
        size = os.fstat(file.fileno()).st_size
    return _metadata_from_header(_parse_header(head, size, path), path)


def _open_checked(path: Path) -> Any:
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file")
    try:
        return open(path, "rb")
    except OSError as err:
        raise WeightsError(f"cannot read weights file {path}: {err}") from err


_DTYPE_BYTES = {"F32": 4}


@functools.lru_cache(maxsize=1)
def _reference_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the fused architecture, from the bundled file's header.

    The shipped file is pinned by its registry sha256, so its header is the reference for
    what any fused LV-UNet holds; only the head (``num_classes``) and the activation
    kernels (``act_num``) vary, and :func:`_expected_shapes` adjusts those.
    """
    # The package's own entry, not registry(): a caller may patch that to other models.
    (entry,) = (e for e in _ENTRIES if e.name == DEFAULT_MODEL)
    path = _fetch_file(entry, entry.filename, entry.sha256, False, "weights")
    with open(path, "rb") as file:
        head = file.read(8)
        head += file.read(struct.unpack("<Q", head)[0])
    header = _parse_header(head, path.stat().st_size, path)
    return {
        key: tuple(int(n) for n in info["shape"])
        for key, info in header.items()
        if key != "__metadata__"
    }


def _expected_shapes(arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    num_classes, kernel = int(arch["num_classes"]), 2 * int(arch["act_num"]) + 1
    shapes = {}
    for key, shape in _reference_shapes().items():
        if key == "head.weight":
            shape = (num_classes, *shape[1:])
        elif key == "head.bias":
            shape = (num_classes,)
        elif key.endswith(".act.weight"):
            shape = (shape[0], shape[1], kernel, kernel)
        shapes[key] = shape
    return shapes


def _check_tensor_headers(
    header: Mapping[str, Any], metadata: Mapping[str, Any], path: Path
) -> None:
    """Compare the declared architecture with the tensor headers, before any tensor is read."""
    arch = {k: v for k, v in metadata["architecture"].items() if k != "in_chans"}
    expected = _expected_shapes(arch)
    declared: dict[str, tuple[int, ...]] = {}
    wrong_dtype = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
            dtype = info["dtype"]
        except (TypeError, KeyError, ValueError) as err:
            raise WeightsError(
                f"{path} is corrupted: malformed entry {key!r} in its header"
            ) from err
        if dtype not in _DTYPE_BYTES:
            wrong_dtype.append(key)
        elif any(n < 0 for n in shape) or end - begin != _DTYPE_BYTES[dtype] * math.prod(shape):
            raise WeightsError(f"{path} is corrupted: tensor {key!r} has inconsistent offsets")
        declared[key] = shape
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    wrong_shape = [
        f"{key} {declared[key]} (expected {expected[key]})"
        for key in sorted(set(expected) & set(declared))
        if declared[key] != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shapes (e.g. {'; '.join(wrong_shape[:3])})")
    if wrong_dtype:
        problems.append(f"non-float32 tensors (e.g. {', '.join(sorted(wrong_dtype)[:3])})")
    if problems:
        raise WeightsError(
            f"{path} does not match the fused LV-UNet architecture {arch}: " + "; ".join(problems)
        )


def _read_checked(
    path: Path, name: str, expected_sha256: str | None
) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """Every check of a weights file, without PyTorch: its tensors, metadata and sha256."""
    with _open_checked(path) as file:
        size = os.fstat(file.fileno()).st_size
        if size > _MAX_FILE_BYTES:
            raise WeightsError(
                f"{path} is {size / 1024**2:.0f} MB, far larger than any LV-UNet weights "
                "file; it is not a weights file"
            )
        try:
            data = file.read()
        except OSError as err:
            raise WeightsError(f"cannot read weights file {path}: {err}") from err
    # Hash, parse and load the same bytes, so the file cannot change in between.
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise WeightsError(
            f"{path} does not match the registered sha256 of model {name!r} "
            f"({expected_sha256}); it was changed or damaged and was not used"
        )
    header = _parse_header(data, len(data), path)
    metadata = _metadata_from_header(header, path)
    _check_tensor_headers(header, metadata, path)
    from safetensors.numpy import load as load_safetensors_bytes

    try:
        tensors = load_safetensors_bytes(data)
    except Exception as err:  # safetensors raises its own error types for bad layouts
        raise WeightsError(f"{path} is corrupted: safetensors cannot read it ({err})") from err
    if tensors_sha256(tensors) != metadata["tensors_sha256"]:
        raise WeightsError(
            f"{path} is corrupted: its weights differ from those it was saved with "
            "(tensors_sha256 mismatch); it was not used"
        )
    if not all(np.isfinite(t).all() for t in tensors.values()):
        raise WeightsError(f"{path} contains NaN or infinite weights; it was not used")
    return tensors, metadata, sha256


def _locate(
    name_or_path: str | os.PathLike[str],
    models: Mapping[str, ModelEntry],
    progressbar: bool | Any,
) -> tuple[Path, str, ModelEntry | None]:
    """The file, display name and registry entry (if any) for a name or path."""
    if isinstance(name_or_path, str) and name_or_path in models:
        entry = models[name_or_path]
        return (
            fetch_weights(entry.name, progressbar=progressbar, registry=models),
            entry.name,
            entry,
        )
    path = Path(name_or_path).expanduser()
    if isinstance(name_or_path, str) and not path.exists() and path.suffix == "":
        _entry(name_or_path, models)  # raises: an unknown model name, not a file path
    return path, path.stem, None


def open_weights(
    name_or_path: str | os.PathLike[str],
    *,
    registry: Mapping[str, ModelEntry] | None = None,
    progressbar: bool | Any = False,
) -> WeightsFile:
    """Open and check weights by registry name or path, without PyTorch.

    Every check of :func:`load_model` runs (file hash against the registry, metadata
    bounds, tensor names, shapes and dtypes against the declared architecture, the
    tensors' hash, finite values); no model is built. A registry model (or a file whose
    bytes equal one) comes with its verified ONNX graph.

    Args:
        name_or_path: A registry name, or the path of a ``.safetensors`` file.
        registry: Models to look names up in (default: :func:`registry`).
        progressbar: Passed to :func:`fetch_weights` when a download is needed.

    Returns:
        The checked file.

    Raises:
        WeightsError: With a message naming the model or file and the problem.
    """
    models = _registry_or_default(registry)
    path, name, entry = _locate(name_or_path, models, progressbar)
    _, metadata, sha256 = _read_checked(path, name, entry.sha256 if entry else None)
    if entry is None:  # the user opened a registry model's file by its path
        entry = next((e for e in models.values() if e.sha256 == sha256), None)
    graph = None
    if entry is not None:
        graph = fetch_graph(entry.name, progressbar=progressbar, registry=models)
    return WeightsFile(
        name=name,
        path=path,
        sha256=sha256,
        metadata=metadata,
        onnx_path=graph,
        onnx_sha256=entry.onnx_sha256 if graph is not None and entry is not None else None,
    )


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    registry: Mapping[str, ModelEntry] | None = None,
    progressbar: bool | Any = True,
) -> LoadedModel:
    """Load fused LV-UNet weights by registry name or from a ``.safetensors`` file.

    A registry name is fetched (see :func:`fetch_weights`) and its file checked against
    the registered sha256. Any file is checked completely before a model is returned:
    safetensors layout, metadata, tensor names and shapes against
    ``LVUNet(fused=True, **architecture)``, and the tensors' hash. Nothing is ever
    unpickled.

    Args:
        name_or_path: A registry name, or the path of a weights file.
        registry: Models to look names up in (default: :func:`registry`).
        progressbar: Passed to :func:`fetch_weights` when a download is needed.

    Returns:
        The fused model (eval mode, CPU) with its metadata, file hash, path and name.

    Raises:
        WeightsError: With a message naming the model or file and the problem.
    """
    import torch

    from .model import LVUNet

    models = _registry_or_default(registry)
    path, name, entry = _locate(name_or_path, models, progressbar)
    tensors, metadata, sha256 = _read_checked(path, name, entry.sha256 if entry else None)
    arch = {k: v for k, v in metadata["architecture"].items() if k != "in_chans"}
    model = LVUNet(**arch).eval()  # bounded: the architecture matched the headers
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    return LoadedModel(model=model, metadata=metadata, sha256=sha256, path=path, name=name)
