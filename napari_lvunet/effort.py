"""Correction effort: how much the user had to correct each saved pair, per model version.

Every pair the widget saves for training comes with a record, ``records/<name>.json`` in
the dataset folder (written by :func:`napari_lvunet._annotations.save_for_training`):
the model run that proposed the mask (weights name and sha256, threshold, sizing,
output), the pixels the user added and removed by hand and Dice(proposal, corrected).
This module reads them back:

* :func:`read_records`: one :class:`EffortRow` per pair, in save order; a record that
  is not valid JSON or not a correction record is skipped with a logged warning.
* :func:`trend`: per model version (the weights' sha256, named as in
  :func:`napari_lvunet.versions.list_versions` where it matches, else by the weights
  name), the number of pairs and the mean Dice(proposal, corrected), in the order the
  versions were first used. A rising mean is the clearest sign that retraining pays off:
  the model proposes more of what the user would have drawn.
* :func:`write_csv`: one row per pair (:data:`CSV_COLUMNS`).

Without napari: ``python -m napari_lvunet.effort DATA [--csv OUT]`` prints the trend.
No torch, no Qt.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._annotations import RECORD_FORMAT, RECORDS_DIR, slice_stem
from .io import atomic_write

__all__ = [
    "CSV_COLUMNS",
    "NO_MODEL",
    "EffortRow",
    "VersionTrend",
    "csv_text",
    "main",
    "read_records",
    "trend",
    "trend_table",
    "version_labels",
    "version_names",
    "write_csv",
]

logger = logging.getLogger(__name__)

_MAX_RECORD_BYTES = 1024**2

#: The columns of :func:`write_csv`, one row per saved pair, in save order:
#:
#: - ``time``: when the pair was saved (ISO 8601, UTC);
#: - ``image``, ``mask``, ``proposal``: its files, relative to the dataset folder
#:   (``proposal`` empty when the model's proposal was not known);
#: - ``slice``: the slice or frame of the stack it was saved from (``z003``,
#:   ``t001_z003``; empty for a 2D image);
#: - ``version``: the model version that proposed the mask (see :func:`trend`);
#: - ``weights_name``, ``weights_sha256``, ``threshold``, ``sizing``, ``output``: that
#:   model run;
#: - ``pixels``: pixels of the slice; ``foreground``: foreground pixels of the saved mask;
#: - ``pixels_added``, ``pixels_removed``: foreground painted / erased by hand
#:   (corrected and not proposed / proposed and not corrected);
#: - ``dice``: Dice(proposal, corrected), 1.0 when both are empty;
#: - ``image_digest``: SHA-256 of the image's pixels (the training split's digest);
#: - ``record``: the record file.
#:
#: Unknown values (no proposal, no model run) are empty cells, never guessed numbers.
CSV_COLUMNS = (
    "time",
    "image",
    "mask",
    "proposal",
    "slice",
    "version",
    "weights_name",
    "weights_sha256",
    "threshold",
    "sizing",
    "output",
    "pixels",
    "foreground",
    "pixels_added",
    "pixels_removed",
    "dice",
    "image_digest",
    "record",
)

#: The label of pairs saved without a known model run (labels drawn from scratch).
NO_MODEL = "(no model)"


@dataclass(frozen=True)
class EffortRow:
    """One saved pair's record. Numbers are None where the record says unknown."""

    record: Path
    time: str
    image: str
    mask: str
    proposal: str | None
    slice: tuple[int, ...]
    weights_name: str | None
    weights_sha256: str | None
    threshold: float | None
    sizing: str | None
    output: str | None
    pixels: int | None
    foreground: int | None
    pixels_added: int | None
    pixels_removed: int | None
    dice: float | None
    image_digest: str | None

    @property
    def model_key(self) -> str | None:
        """What identifies the model version: its weights' sha256, else its name."""
        return self.weights_sha256 or self.weights_name


@dataclass(frozen=True)
class VersionTrend:
    """Dice(proposal, corrected) of the pairs one model version proposed.

    Attributes:
        key: The weights' sha256 (or name when no sha256 was recorded); None for pairs
            saved without a model run.
        label: The version's name (see :func:`trend`).
        pairs: Pairs saved from this version's proposals.
        scored: Of those, the pairs whose proposal is known (they have a Dice).
        mean_dice: Mean Dice(proposal, corrected) over ``scored``; None when 0.
        first_time: When the first of its pairs was saved.
    """

    key: str | None
    label: str
    pairs: int
    scored: int
    mean_dice: float | None
    first_time: str


def _optional(record: Mapping[str, Any], key: str, kind: type) -> Any:
    value = record.get(key)
    if value is None:
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{key} is not finite")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} is not a pixel count")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{key} is not text")
    return value


def _row(path: Path, record: Any) -> EffortRow:
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a {RECORD_FORMAT} record")
    index = record.get("slice", [])
    if not isinstance(index, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in index
    ):
        raise ValueError("slice is not a list of integers")
    dice = _optional(record, "dice", float)
    if dice is not None and not 0.0 <= dice <= 1.0:
        raise ValueError(f"dice {dice} is outside [0, 1]")
    time = _optional(record, "time", str)
    if not time:
        raise ValueError("no time")
    return EffortRow(
        record=path,
        time=time,
        image=_optional(record, "image", str) or "",
        mask=_optional(record, "mask", str) or "",
        proposal=_optional(record, "proposal", str),
        slice=tuple(index),
        weights_name=_optional(record, "weights_name", str),
        weights_sha256=_optional(record, "weights_sha256", str),
        threshold=_optional(record, "threshold", float),
        sizing=_optional(record, "sizing", str),
        output=_optional(record, "output", str),
        pixels=_optional(record, "pixels", int),
        foreground=_optional(record, "foreground", int),
        pixels_added=_optional(record, "pixels_added", int),
        pixels_removed=_optional(record, "pixels_removed", int),
        dice=dice,
        image_digest=_optional(record, "image_digest", str),
    )


def read_records(folder: str | os.PathLike[str]) -> list[EffortRow]:
    """The correction records of a dataset folder, in save order (time, then name).

    A record that cannot be read, is larger than 1 MB, is not JSON or not a correction
    record is skipped with a warning; it is never changed. A folder without records
    gives an empty list.
    """
    records = Path(folder) / RECORDS_DIR
    rows: list[EffortRow] = []
    if not records.is_dir():
        return rows
    for path in sorted(records.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            if path.stat().st_size > _MAX_RECORD_BYTES:
                raise ValueError("larger than 1 MB")
            rows.append(_row(path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            logger.warning("skipping the correction record %s: %s", path, err)
    rows.sort(key=lambda r: (r.time, r.record.name))
    return rows


def version_names(models_folder: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """sha256 -> name of every model version (:func:`napari_lvunet.versions.list_versions`).

    Empty (with a warning) when the versions cannot be listed.
    """
    from . import versions

    try:
        listed = versions.list_versions(models_folder)
    except Exception as err:  # a broken models folder must not hide the effort table
        logger.warning("cannot list the model versions: %s", err)
        return {}
    return {v.sha256: v.name for v in listed if v.sha256}


def trend(rows: Sequence[EffortRow], names: Mapping[str, str] | None = None) -> list[VersionTrend]:
    """Pairs and mean Dice(proposal, corrected) per model version, in order of first use.

    Args:
        rows: :func:`read_records`' rows (in save order).
        names: sha256 -> version name; :func:`version_names` when None. A version not
            in it is labelled by its weights name (and a short sha256 when two versions
            share a name).
    """
    names = version_names() if names is None else names
    groups: dict[str | None, list[EffortRow]] = {}
    for row in rows:
        groups.setdefault(row.model_key, []).append(row)
    result = []
    for key, members in groups.items():
        scored = [r.dice for r in members if r.dice is not None]
        result.append(
            VersionTrend(
                key=key,
                label=_label(key, members[0], names),
                pairs=len(members),
                scored=len(scored),
                mean_dice=sum(scored) / len(scored) if scored else None,
                first_time=members[0].time,
            )
        )
    seen: dict[str, int] = {}
    for item in result:
        seen[item.label] = seen.get(item.label, 0) + 1
    return [_disambiguated(item) if seen[item.label] > 1 and item.key else item for item in result]


def _label(key: str | None, row: EffortRow, names: Mapping[str, str]) -> str:
    if key is None:
        return NO_MODEL
    if row.weights_sha256 and row.weights_sha256 in names:
        return names[row.weights_sha256]
    return row.weights_name or f"sha256 {key[:12]}"


def _disambiguated(item: VersionTrend) -> VersionTrend:
    return replace(item, label=f"{item.label} ({(item.key or '')[:8]})")


def version_labels(rows: Sequence[EffortRow], trends: Sequence[VersionTrend]) -> list[str]:
    """Each row's version label (as in ``trends``), for tables and plots."""
    by_key = {t.key: t.label for t in trends}
    return [by_key.get(r.model_key, NO_MODEL) for r in rows]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _slice_text(index: tuple[int, ...]) -> str:
    return slice_stem("", index)[1:]


def csv_text(folder: str | os.PathLike[str], names: Mapping[str, str] | None = None) -> str:
    """The CSV of :func:`write_csv`, as text."""
    rows = read_records(folder)
    labels = version_labels(rows, trend(rows, names))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row, label in zip(rows, labels, strict=True):
        values = {
            "time": row.time,
            "image": row.image,
            "mask": row.mask,
            "proposal": row.proposal,
            "slice": _slice_text(row.slice),
            "version": label,
            "weights_name": row.weights_name,
            "weights_sha256": row.weights_sha256,
            "threshold": row.threshold,
            "sizing": row.sizing,
            "output": row.output,
            "pixels": row.pixels,
            "foreground": row.foreground,
            "pixels_added": row.pixels_added,
            "pixels_removed": row.pixels_removed,
            "dice": row.dice,
            "image_digest": row.image_digest,
            "record": f"{RECORDS_DIR}/{row.record.name}",
        }
        writer.writerow([_cell(values[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def write_csv(
    folder: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write one row per saved pair of ``folder`` (:data:`CSV_COLUMNS`) to ``path``.

    Written through :func:`napari_lvunet.io.atomic_write`: a crash leaves the old file or
    none.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is False.
    """
    data = csv_text(folder, names).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data), overwrite=overwrite)


def trend_table(trends: Sequence[VersionTrend]) -> str:
    """The trend as a plain-text table (the command line's output)."""
    header = ("model version", "pairs", "with proposal", "mean Dice", "first saved")
    lines = [
        (
            t.label,
            str(t.pairs),
            str(t.scored),
            "-" if t.mean_dice is None else f"{t.mean_dice:.3f}",
            t.first_time[:19].replace("T", " "),
        )
        for t in trends
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), *(fmt(r) for r in lines)])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_lvunet.effort DATA [--csv OUT [--overwrite]]``."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_lvunet.effort",
        description=(
            "Correction effort of a dataset folder saved by the napari-lvunet widget: per "
            "model version, the pairs saved and the mean Dice between the model's proposal "
            "and the corrected mask (higher: less to correct)."
        ),
    )
    parser.add_argument("data", type=Path, help="dataset folder (with records/)")
    parser.add_argument("--csv", type=Path, help="also write one row per pair to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --csv")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"{args.data} is not a folder")
    if args.csv is not None and args.csv.exists() and not args.overwrite:
        parser.error(f"{args.csv} exists; pass --overwrite to replace it")
    rows = read_records(args.data)
    if not rows:
        print(f"no correction records in {args.data / RECORDS_DIR}")
        return 0
    names = version_names()
    print(trend_table(trend(rows, names)))
    if args.csv is not None:
        try:
            write_csv(args.data, args.csv, overwrite=args.overwrite, names=names)
        except OSError as err:
            print(f"error: cannot write {args.csv}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {len(rows)} row(s) to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
