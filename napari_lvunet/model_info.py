"""What a model is, in plain words, for the widget's model panel (no Qt, no torch).

Everything shown comes from the weights' own metadata (``weights.read_metadata``: the
file's header only; no tensor is read or hashed) and, for a registry model, from its
registry entry's ``meta``. A number that is in neither is never shown: a missing figure
says so. A fine-tuned file (written by ``python -m training.finetune``) says what it was
fine-tuned from, on how many pairs from which folder, its held-out Dice before and after,
and that its test figures are its base model's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import weights as weights_mod

__all__ = ["INTENDED_USE", "ModelInfo", "describe", "model_info"]

#: The plugin's intended use (docs/MODEL_CARD.md), the same for every model it runs.
INTENDED_USE = (
    "research and annotation help, not diagnosis: a first mask that a person checks and corrects"
)

# What the images of a dataset show, and how to cite it, by the name training records.
_DATASETS = {
    "kvasir-seg": ("polyps in colonoscopy images", "Kvasir-SEG (Jha et al., MMM 2020)"),
}


@dataclass(frozen=True)
class ModelInfo:
    """A model described for people: ``(heading, text)`` rows, in display order.

    Attributes:
        name: The model's name (registry name or file stem).
        rows: ``(heading, text)`` pairs: Segments, Learnt from, Fine-tuned (a fine-tuned
            file only), Test, Intended use, Licence; a Note first when the file's own
            description could not be read.
        problem: Why the file's own description could not be read, or ``""``.
    """

    name: str
    rows: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    problem: str = ""

    def row(self, heading: str) -> str | None:
        """The text under ``heading``, or None when there is no such row."""
        return next((text for head, text in self.rows if head == heading), None)

    @property
    def text(self) -> str:
        """Plain text, one ``Heading: text`` line per row."""
        return "\n".join(f"{head}: {text}" for head, text in self.rows)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _test_figures(metadata: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """``Dice 0.873, IoU 0.799 (200 test images; ...)`` from the file, else the registry."""
    test = _mapping(_mapping(metadata.get("metrics")).get("test"))
    dice, iou = _number(test.get("dice")), _number(test.get("iou"))
    details = []
    if dice is None and iou is None:
        metrics = _mapping(meta.get("metrics"))
        dice, iou = _number(metrics.get("test_dice")), _number(metrics.get("test_iou"))
    else:
        n = test.get("n")
        if isinstance(n, int) and not isinstance(n, bool):
            details.append(f"{n} test images")
        if _text(test.get("note")):
            details.append(test["note"])
    figures = [f"{what} {value:.3f}" for what, value in (("Dice", dice), ("IoU", iou))
               if value is not None]  # fmt: skip
    if not figures:
        return ""
    return ", ".join(figures) + (f" ({'; '.join(details)})" if details else "")


def _segments(metadata: Mapping[str, Any], dataset: str) -> str:
    classes = _mapping(metadata.get("architecture")).get("num_classes")
    what = _DATASETS.get(dataset.lower(), ("", ""))[0]
    if classes in (1, None):
        if what:
            return f"{what} (one class: the object against the background)"
        if dataset:
            return f"what the masks of {dataset!r} mark (one class against the background)"
        return "one class against the background (what it learnt from is not recorded)"
    return f"{classes} classes" + (f" in {what}" if what else "")


def _learnt_from(metadata: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    if _text(meta.get("dataset")):
        split = _text(meta.get("split"))
        return meta["dataset"] + (f"; {split}" if split else "")
    if _text(metadata.get("dataset")):
        return metadata["dataset"]  # a free-text note, as save_weights' callers may write
    dataset = _mapping(metadata.get("dataset"))
    name = _text(dataset.get("name"))
    if not name:
        return "not recorded in the weights file"
    shown = _DATASETS.get(name.lower(), ("", name))[1]
    counts = _mapping(_mapping(dataset.get("split")).get("counts"))
    split = [f"{counts[k]} {k}" for k in ("train", "val", "test")
             if isinstance(counts.get(k), int)]  # fmt: skip
    return shown + (f" ({' / '.join(split)} images)" if split else "")


def _before_after(metrics: Mapping[str, Any], what: str) -> tuple[float | None, float | None]:
    return (
        _number(_mapping(metrics.get(f"{what}_before")).get("dice")),
        _number(_mapping(metrics.get(f"{what}_after")).get("dice")),
    )


def _finetune_text(base_name: str, metadata: Mapping[str, Any]) -> str:
    """``fine-tuned from X on N pairs from 'FOLDER' (M held out), held-out Dice a -> b``."""
    dataset = _mapping(metadata.get("dataset"))
    train, held = dataset.get("finetune_images"), dataset.get("heldout_images")
    text = f"fine-tuned from {base_name}"
    if isinstance(train, list):
        text += f" on {len(train)} pair{'' if len(train) == 1 else 's'}"
    if _text(dataset.get("name")):
        text += f" from {dataset['name']!r}"
    if isinstance(held, list) and held:
        text += f" ({len(held)} more held out)"
    metrics = _mapping(metadata.get("metrics"))
    before, after = _before_after(metrics, "heldout")
    if before is not None and after is not None:
        text += f", held-out Dice {before:.3f} -> {after:.3f}"
    else:
        text += ", held-out Dice not measured"
    before, after = _before_after(metrics, "reference")
    if before is not None and after is not None:
        text += f"; reference set Dice {before:.3f} -> {after:.3f}"
    return text


@dataclass(frozen=True)
class Base:
    """The model a fine-tuned file started from, as far as it could be found.

    Attributes:
        name: Its name as the fine-tuned file records it.
        metadata: Its weights file's metadata (empty when the file is not at hand).
        meta: Its registry entry's ``meta`` (empty for a file).
    """

    name: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


def describe(
    name: str,
    metadata: Mapping[str, Any] | None,
    *,
    meta: Mapping[str, Any] | None = None,
    base: Base | None = None,
    problem: str = "",
) -> ModelInfo:
    """Describe a model from its metadata (pure: nothing is read).

    Args:
        name: The model's name.
        metadata: The weights file's metadata, or None when the file is not at hand
            (a registry model not downloaded yet, a file that cannot be read).
        meta: The registry entry's ``meta`` (dataset, split, metrics, licence), if any.
        base: For a fine-tuned file, its base model where it could be found.
        problem: Why the file's metadata is missing, shown first.

    Returns:
        The rows to show.
    """
    metadata = metadata or {}
    meta = meta or {}
    rows: list[tuple[str, str]] = [("Note", problem)] if problem else []
    base_ref = _mapping(metadata.get("base_weights"))
    own_dataset = _text(_mapping(metadata.get("dataset")).get("name"))
    licence = _text(meta.get("licence")) or _text(metadata.get("licence"))
    if base_ref:
        base_name = _text(base_ref.get("name")) or _text(base_ref.get("checkpoint")) or "?"
        found = base or Base(base_name)
        base_dataset = _text(_mapping(found.metadata.get("dataset")).get("name"))
        rows.append(("Segments", _segments(metadata, base_dataset or own_dataset)))
        rows.append(("Learnt from", _finetune_text(base_name, metadata)))
        if found.metadata or found.meta:
            rows.append(("Base model learnt from", _learnt_from(found.metadata, found.meta)))
        figures = _test_figures(found.metadata, found.meta)
        rows.append(
            (
                "Test",
                f"{figures}: the base model's ({base_name}), not measured after fine-tuning"
                if figures
                else f"none recorded (fine-tuned from {base_name})",
            )
        )
        base_licence = _text(found.meta.get("licence")) or _text(found.metadata.get("licence"))
        if not licence and base_licence:
            licence = f"derives from {base_name}: {base_licence}"
    else:
        rows.append(("Segments", _segments(metadata, own_dataset)))
        rows.append(("Learnt from", _learnt_from(metadata, meta)))
        rows.append(("Test", _test_figures(metadata, meta) or "none recorded in the weights"))
    rows.append(("Intended use", INTENDED_USE))
    rows.append(("Licence", licence or "not recorded in the weights"))
    return ModelInfo(name=name, rows=tuple(rows), problem=problem)


@functools.lru_cache(maxsize=64)
def _metadata_by_stat(path: str, _inode: int, _size: int, _mtime_ns: int) -> Mapping[str, Any]:
    # Keyed by inode, size and time: a replaced or rewritten file is read again.
    return weights_mod.read_metadata(path)


def _read(path: Path) -> Mapping[str, Any]:
    stat = path.stat()
    return _metadata_by_stat(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _registry_file(name: str, models: Mapping[str, weights_mod.ModelEntry]) -> Path | None:
    """A registry model's local file when it is at hand (bundled or downloaded)."""
    if not weights_mod.is_available_offline(name, registry=models):
        return None
    entry = models[name]
    folder = weights_mod.bundled_dir() if entry.bundled else weights_mod.cache_dir()
    return folder / entry.filename


def _registry_metadata(name: str, models: Mapping[str, weights_mod.ModelEntry]) -> dict:
    try:
        path = _registry_file(name, models)
        return dict(_read(path)) if path is not None else {}
    except (OSError, weights_mod.WeightsError):
        return {}


def _find_base(
    ref: Mapping[str, Any], models: Mapping[str, weights_mod.ModelEntry], beside: Path
) -> Base | None:
    """A fine-tuned file's base: a registry model, or a ``NAME.safetensors`` beside it."""
    name = _text(ref.get("name"))
    if not name:
        return None
    entry = models.get(name)
    if entry is not None and ref.get("sha256") in (None, entry.sha256):
        return Base(name, _registry_metadata(name, models), entry.meta)
    candidate = beside.parent / f"{name}.safetensors"
    try:
        if candidate.is_file() and weights_mod.file_sha256(candidate) == ref.get("sha256"):
            # Its own figures only; a chain of fine-tunes is not followed further.
            return Base(name, _read(candidate))
    except (OSError, weights_mod.WeightsError):
        pass
    return None


def model_info(
    key: str | os.PathLike[str],
    *,
    registry: Mapping[str, weights_mod.ModelEntry] | None = None,
) -> ModelInfo:
    """Describe a model-picker key: a registry name or a ``.safetensors`` path.

    Reads only weights files' headers (cached by inode, size and time) and never
    downloads: a registry model not downloaded yet is described from its registry entry.

    Args:
        key: Registry name or path.
        registry: Models to look names up in (default: ``weights.registry()``).

    Returns:
        The description; for a file that cannot be read, one whose Note says why.
    """
    models = weights_mod.registry() if registry is None else registry
    if isinstance(key, str) and key in models:
        entry = models[key]
        metadata = _registry_metadata(key, models)
        problem = "" if metadata else "its weights are not downloaded yet (the list's facts)"
        return describe(key, metadata or None, meta=entry.meta, problem=problem)
    path = Path(key).expanduser()
    try:
        metadata = _read(path)
    except OSError as err:
        return describe(path.stem, None, problem=f"cannot read {path.name}: {err.strerror}")
    except weights_mod.WeightsError as err:
        return describe(path.stem, None, problem=str(err))
    # A registry model's file opened by its path: the same tensors, the same facts.
    same = next(
        (
            entry
            for name, entry in models.items()
            if _registry_metadata(name, models).get("tensors_sha256")
            == metadata.get("tensors_sha256")
        ),
        None,
    )
    base = _find_base(_mapping(metadata.get("base_weights")), models, path)
    return describe(path.stem, metadata, meta=same.meta if same else None, base=base)
