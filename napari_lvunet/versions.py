"""Model versions: every fine-tune's result, kept in a user models folder, across sessions.

A clinician retrains, compares, keeps or goes back, and finds the result again tomorrow.
Each fine-tune's weights are *registered* (:func:`register`): copied into the models
folder under a name no other file has, with a JSON sidecar beside them that records
what the version is: its name and date, the base model and that model's sha256, the
number of pairs and the data folder it was trained on, and the held-out and reference
Dice before and after. :func:`list_versions` reads the sidecars (so the list survives
restarts; there is no shared index for two processes to race on), with the bundled model
always first. :func:`select` makes a version the current one (also the bundled one: going
back is selecting an earlier version) and :func:`current` reads it back. :func:`delete`
removes a version's files; the bundled model cannot be deleted.

Nothing is overwritten: weights and sidecars are written once, through
:func:`napari_lvunet.io.atomic_write` without ``overwrite``, under free names. The only
file that changes is ``current.json``, the choice of the current version.

The folder is ``$NAPARI_LVUNET_MODELS`` when set, else ``models/`` in the weights cache
(:func:`napari_lvunet.weights.cache_dir`). This module imports neither torch nor napari.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .io import atomic_write
from .weights import DEFAULT_MODEL

__all__ = [
    "BUNDLED_ID",
    "MODELS_ENV",
    "Version",
    "VersionError",
    "current",
    "delete",
    "get",
    "list_versions",
    "models_dir",
    "register",
    "select",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the models folder.
MODELS_ENV = "NAPARI_LVUNET_MODELS"
_FORMAT = "napari-lvunet-version"
_FORMAT_VERSION = 1
_CURRENT = "current.json"
_MAX_SIDECAR_BYTES = 1024**2
_STEM_OK = re.compile(r"[^A-Za-z0-9._-]+")


class VersionError(ValueError):
    """A version cannot be registered, found, selected or deleted; the message says why."""


#: The id of the bundled model's version (the registry's default model).
BUNDLED_ID = DEFAULT_MODEL


@dataclass(frozen=True)
class Version:
    """One model version.

    Attributes:
        id: Unique within the folder: the weights file's stem (the registry name for the
            bundled model).
        name: What the user calls it (defaults to ``id``).
        created: ISO 8601 time (UTC) it was registered; ``""`` for the bundled model.
        weights: The ``.safetensors`` file, or the registry name of the bundled model
            (what :func:`napari_lvunet.weights.open_weights` and the inference pool take).
        sha256: SHA-256 of the weights file's bytes.
        base: The model it was fine-tuned from: ``{"name": ..., "sha256": ...}``.
        pairs: Image/mask pairs it was trained on (training and held-out).
        data_folder: The folder of those pairs.
        heldout_dice: ``{"before": ..., "after": ...}`` on the held-out pairs (``None``
            where unknown).
        reference_dice: ``{"before": ..., "after": ...}`` on the shipped reference set.
        extra: Anything else recorded (for example the fine-tune's options).
        bundled: Whether this is the bundled model (cannot be deleted).
    """

    id: str
    name: str
    created: str
    weights: str
    sha256: str
    base: Mapping[str, Any] = field(default_factory=dict)
    pairs: int | None = None
    data_folder: str | None = None
    heldout_dice: Mapping[str, float | None] = field(default_factory=dict)
    reference_dice: Mapping[str, float | None] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    bundled: bool = False

    @property
    def label(self) -> str:
        """A one-line description for a picker: name, date and held-out Dice."""
        if self.bundled:
            return f"{self.name} (bundled)"
        parts = [self.name, self.created[:16].replace("T", " ")]
        after = self.heldout_dice.get("after")
        if isinstance(after, int | float):
            parts.append(f"held-out Dice {after:.3f}")
        return ", ".join(parts)


def models_dir() -> Path:
    """The models folder: ``$NAPARI_LVUNET_MODELS``, else ``<weights cache>/models``."""
    env = os.environ.get(MODELS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    from .weights import cache_dir

    return cache_dir() / "models"


def _folder(folder: str | os.PathLike[str] | None) -> Path:
    return Path(folder) if folder is not None else models_dir()


def _bundled() -> Version:
    from .weights import registry

    entry = registry()[DEFAULT_MODEL]
    return Version(
        id=DEFAULT_MODEL,
        name=DEFAULT_MODEL,
        created="",
        weights=DEFAULT_MODEL,
        sha256=entry.sha256,
        bundled=True,
    )


def _dice_pair(value: Any, what: str) -> dict[str, float | None]:
    if value is None:
        return {"before": None, "after": None}
    if isinstance(value, Mapping):
        before, after = value.get("before"), value.get("after")
    else:
        try:
            before, after = value
        except (TypeError, ValueError):
            raise VersionError(f"{what} must be (before, after), got {value!r}") from None
    out: dict[str, float | None] = {}
    for key, v in (("before", before), ("after", after)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise VersionError(f"{what} {key} must be a number or None, got {v!r}")
        out[key] = None if v is None else float(v)
    return out


def _free_stem(folder: Path, stem: str) -> str:
    candidate, n = stem, 2
    while any((folder / f"{candidate}{s}").exists() for s in (".safetensors", ".pt", ".json")):
        candidate = f"{stem}-{n}"
        n += 1
    return candidate


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src:
        atomic_write(target, lambda f: shutil.copyfileobj(src, f, 1024**2), overwrite=False)


def register(
    weights: str | os.PathLike[str],
    *,
    name: str | None = None,
    pairs: int | None = None,
    data_folder: str | os.PathLike[str] | None = None,
    heldout_dice: Any = None,
    reference_dice: Any = None,
    base: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    folder: str | os.PathLike[str] | None = None,
) -> Version:
    """Copy a fine-tune's weights into the models folder and record them as a version.

    The weights are checked (:func:`napari_lvunet.weights.open_weights`) before anything
    is written. An unfused ``.pt`` checkpoint beside them (what fine-tuning from a
    checkpoint writes, to fine-tune again from) is copied along. The copies get the
    weights' stem, or ``stem-2``, ``stem-3`` ... when that is taken; the sidecar
    ``<stem>.json`` is written last, so a version is listed only once its files are
    complete.

    Args:
        weights: The ``.safetensors`` file a fine-tune wrote.
        name: The version's name (default: its id).
        pairs: Number of image/mask pairs it was trained on (default: from the
            weights' metadata, training plus held-out images).
        data_folder: The pairs' folder.
        heldout_dice: ``(before, after)`` or ``{"before", "after"}`` on the held-out
            pairs (default: from the weights' metadata).
        reference_dice: ``(before, after)`` on the shipped reference set (default:
            from the weights' metadata).
        base: ``{"name", "sha256"}`` of the model it was fine-tuned from (default:
            ``base_weights`` of the metadata).
        extra: More to record (JSON-serialisable), e.g. the fine-tune's options.
        folder: The models folder (default :func:`models_dir`); created if missing.

    Returns:
        The new version.

    Raises:
        VersionError: If the weights are unusable or an argument is malformed (nothing
            is written).
        OSError: If the folder cannot be written (nothing is left half-written).
    """
    from .weights import WeightsError, open_weights

    source = Path(weights)
    try:
        checked = open_weights(source)
    except (WeightsError, OSError, ValueError) as err:
        raise VersionError(f"cannot register {source}: {err}") from None
    meta = dict(checked.metadata)
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), Mapping) else {}
    if pairs is None and dataset:
        images = [*dataset.get("finetune_images", []), *dataset.get("heldout_images", [])]
        pairs = len(images) or None
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0):
        raise VersionError(f"pairs must be a whole number >= 0, got {pairs!r}")
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), Mapping) else {}

    def recorded(what: str) -> dict[str, Any]:
        found = {}
        for key in ("before", "after"):
            entry = metrics.get(f"{what}_{key}")
            found[key] = entry.get("dice") if isinstance(entry, Mapping) else None
        return found

    if heldout_dice is None and metrics:
        heldout_dice = recorded("heldout")
    if reference_dice is None and metrics:
        reference_dice = recorded("reference")
    if base is None:
        raw = meta.get("base_weights") if isinstance(meta.get("base_weights"), Mapping) else {}
        base = {k: raw[k] for k in ("name", "sha256", "checkpoint") if k in raw}
    record_extra = dict(extra or {})
    if "finetune" in meta and "finetune" not in record_extra:
        record_extra["finetune"] = meta["finetune"]
    record: dict[str, Any] = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "name": str(name) if name else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": checked.sha256,
        "base": dict(base),
        "pairs": pairs,
        "data_folder": None if data_folder is None else str(Path(data_folder).resolve()),
        "heldout_dice": _dice_pair(heldout_dice, "heldout_dice"),
        "reference_dice": _dice_pair(reference_dice, "reference_dice"),
        "extra": record_extra,
    }
    try:
        text = json.dumps(record, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise VersionError(f"the version record is not plain JSON: {err}") from None

    target = _folder(folder)
    target.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(target, _STEM_OK.sub("-", source.stem).strip("-.") or "version")
    written: list[Path] = []
    try:
        for suffix in (".safetensors", ".pt"):
            src = source.with_suffix(suffix)
            if suffix == ".safetensors" or src.is_file():
                dst = target / f"{stem}{suffix}"
                _copy(src, dst)
                written.append(dst)
        record["weights"] = f"{stem}.safetensors"
        if record["name"] is None:
            record["name"] = stem
        sidecar = target / f"{stem}.json"
        text = json.dumps(record, indent=1, allow_nan=False)
        atomic_write(sidecar, lambda f: f.write(text.encode("utf-8")), overwrite=False)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    logger.info("registered %s as version %s in %s", source, stem, target)
    return _from_record(stem, record, target)


def _from_record(stem: str, record: Mapping[str, Any], folder: Path) -> Version:
    def text(key: str) -> str:
        value = record.get(key)
        if not isinstance(value, str):
            raise VersionError(f"{key!r} must be a string")
        return value

    if record.get("format") != _FORMAT or record.get("format_version") != _FORMAT_VERSION:
        raise VersionError("not a napari-lvunet version record")
    weights = text("weights")
    if weights != f"{stem}.safetensors":
        raise VersionError(f"names weights {weights!r}, not {stem}.safetensors")
    pairs = record.get("pairs")
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int)):
        raise VersionError("'pairs' must be a whole number")
    data_folder = record.get("data_folder")
    if data_folder is not None and not isinstance(data_folder, str):
        raise VersionError("'data_folder' must be a string")
    for key in ("base", "extra"):
        if not isinstance(record.get(key, {}), Mapping):
            raise VersionError(f"{key!r} must be an object")
    return Version(
        id=stem,
        name=text("name"),
        created=text("created"),
        weights=str(folder / weights),
        sha256=text("sha256"),
        base=dict(record.get("base", {})),
        pairs=pairs,
        data_folder=data_folder,
        heldout_dice=_dice_pair(record.get("heldout_dice"), "heldout_dice"),
        reference_dice=_dice_pair(record.get("reference_dice"), "reference_dice"),
        extra=dict(record.get("extra", {})),
    )


def _read(sidecar: Path) -> Version:
    if sidecar.stat().st_size > _MAX_SIDECAR_BYTES:
        raise VersionError("larger than 1 MB")
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise VersionError(f"not JSON: {err}") from None
    if not isinstance(record, dict):
        raise VersionError("not a JSON object")
    version = _from_record(sidecar.stem, record, sidecar.parent)
    if not Path(version.weights).is_file():
        raise VersionError(f"its weights {Path(version.weights).name} are missing")
    return version


def list_versions(folder: str | os.PathLike[str] | None = None) -> list[Version]:
    """The bundled model, then every registered version, oldest first.

    A sidecar that cannot be read, or whose weights file is gone, is skipped with a
    warning (it is never changed or removed).
    """
    target = _folder(folder)
    found: list[Version] = []
    if target.is_dir():
        for sidecar in sorted(target.glob("*.json")):
            if sidecar.name == _CURRENT or sidecar.name.startswith("."):
                continue
            try:
                found.append(_read(sidecar))
            except (OSError, VersionError) as err:
                logger.warning("skipping the model version %s: %s", sidecar, err)
    found.sort(key=lambda v: (v.created, v.id))
    return [_bundled(), *found]


def get(version_id: str, folder: str | os.PathLike[str] | None = None) -> Version:
    """The version with this id (the bundled model's id is its registry name).

    Raises:
        VersionError: If there is no such version.
    """
    for version in list_versions(folder):
        if version.id == version_id:
            return version
    raise VersionError(f"no model version {version_id!r} in {_folder(folder)}")


def select(version_id: str, folder: str | os.PathLike[str] | None = None) -> Version:
    """Make a version the current one (going back is selecting an earlier one).

    Raises:
        VersionError: If there is no such version.
    """
    version = get(version_id, folder)
    target = _folder(folder)
    target.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"current": version.id}).encode("utf-8")
    atomic_write(target / _CURRENT, lambda f: f.write(payload), overwrite=True)
    return version


def current(folder: str | os.PathLike[str] | None = None) -> Version:
    """The current version: the last one selected, or the bundled model (also when the
    selected one was deleted or its file is unreadable)."""
    path = _folder(folder) / _CURRENT
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))["current"]
        return get(str(chosen), folder)
    except FileNotFoundError:
        return _bundled()
    except (OSError, ValueError, KeyError, TypeError, VersionError) as err:
        logger.warning("using the bundled model: the current version is unusable (%s)", err)
        return _bundled()


def delete(version_id: str, folder: str | os.PathLike[str] | None = None) -> None:
    """Delete a version's files (sidecar first, so a half-done delete is never listed).

    The current choice falls back to the bundled model if it was this version.

    Raises:
        VersionError: For the bundled model, or an unknown version.
    """
    version = get(version_id, folder)
    if version.bundled:
        raise VersionError("the bundled model cannot be deleted")
    target = _folder(folder)
    was_current = current(folder).id == version.id
    (target / f"{version.id}.json").unlink()
    for suffix in (".safetensors", ".pt"):
        (target / f"{version.id}{suffix}").unlink(missing_ok=True)
    if was_current:
        select(BUNDLED_ID, folder)
    logger.info("deleted the model version %s", version.id)
