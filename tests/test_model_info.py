"""The model panel's text (``napari_lvunet.model_info``): Qt-free, torch-free.

Every figure the panel shows must be one the weights' metadata or the registry entry
holds; these tests take each number out of the text and look for it there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from lvunet_test_helpers import tiny_pairs_folder, weights_in_child

from napari_lvunet import weights
from napari_lvunet.model_info import INTENDED_USE, Base, describe, model_info

_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _unsourced_numbers(text: str, *sources: Mapping[str, Any]) -> list[str]:
    """Numbers in ``text`` that are neither a recorded value (as shown, 3 decimals) nor
    part of a recorded string, nor a count of a recorded list."""
    leaves = [leaf for source in sources for leaf in _leaves(source)]
    strings = [leaf for leaf in leaves if isinstance(leaf, str)]
    numbers = {
        f"{leaf:.3f}" if isinstance(leaf, float) else str(leaf)
        for leaf in leaves
        if isinstance(leaf, int | float) and not isinstance(leaf, bool)
    }
    counts = {
        str(len(v))
        for source in sources
        for v in _all_values(source)
        if isinstance(v, list | tuple) and not all(isinstance(x, int | float) for x in v)
    }
    return [
        token
        for token in _NUMBER.findall(text)
        if token not in numbers and token not in counts and not any(token in s for s in strings)
    ]


def _all_values(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield item
            yield from _all_values(item)


def test_bundled_model_described_from_its_metadata_and_registry_entry() -> None:
    entry = weights.registry()[weights.DEFAULT_MODEL]
    metadata = weights.open_weights(weights.DEFAULT_MODEL).metadata
    info = model_info(weights.DEFAULT_MODEL)
    assert [head for head, _ in info.rows] == [
        "Segments",
        "Learnt from",
        "Test",
        "Intended use",
        "Licence",
    ]
    assert "polyps" in info.row("Segments")
    assert entry.meta["dataset"] in info.row("Learnt from")
    test = metadata["metrics"]["test"]
    assert f"Dice {test['dice']:.3f}" in info.row("Test")
    assert f"IoU {test['iou']:.3f}" in info.row("Test")
    assert f"{test['n']} test images" in info.row("Test")
    assert info.row("Intended use") == INTENDED_USE and "not diagnosis" in INTENDED_USE
    assert info.row("Licence") == entry.meta["licence"]
    assert not _unsourced_numbers(info.text, metadata, dict(entry.meta))
    # The same file opened by its path is the same model, described alike.
    by_path = model_info(weights.fetch_weights(weights.DEFAULT_MODEL, progressbar=False))
    assert by_path.rows == info.rows


def test_registry_model_not_downloaded_is_described_from_its_entry(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "empty-cache"))
    bundled = weights.registry()[weights.DEFAULT_MODEL]
    entry = weights.ModelEntry(
        name="remote-model",
        filename="remote-model.safetensors",
        sha256="0" * 64,
        description="a model on a server",
        meta={"dataset": "Some polyp set", "metrics": {"test_dice": 0.8123}},
    )
    info = model_info("remote-model", registry={"remote-model": entry, bundled.name: bundled})
    assert "not downloaded" in info.row("Note")
    assert info.row("Learnt from") == "Some polyp set"
    assert info.row("Test") == "Dice 0.812"  # no IoU: none recorded, none invented
    assert info.row("Licence") == "not recorded in the weights"


def test_file_without_figures_says_so(tmp_path: Path) -> None:
    path = weights_in_child(tmp_path / "random.safetensors")
    info = model_info(path)
    metadata = weights.read_metadata(path)
    assert info.name == "random"
    assert info.row("Learnt from") == metadata["dataset"]  # the free-text note it carries
    assert info.row("Test") == "none recorded in the weights"
    assert not _NUMBER.findall(info.row("Test"))
    assert not _unsourced_numbers(info.text, metadata)


def test_unreadable_files_say_why(tmp_path: Path) -> None:
    missing = model_info(tmp_path / "gone.safetensors")
    assert missing.row("Note") == "cannot read gone.safetensors: No such file or directory"
    pickle = tmp_path / "model.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's opening bytes
    refused = model_info(pickle)
    assert "model.safetensors" in refused.row("Note") and refused.problem
    for info in (missing, refused):
        assert info.row("Test") == "none recorded in the weights"
        assert info.row("Intended use") == INTENDED_USE


def test_finetuned_metadata_names_base_pairs_folder_and_dice() -> None:
    metadata = {
        "architecture": {"num_classes": 1},
        "dataset": {
            "name": "centre-b",
            "finetune_images": ["a", "b", "c", "d"],
            "heldout_images": ["e"],
        },
        "base_weights": {"name": "lvunet-kvasir-seg", "sha256": "ab" * 32},
        "metrics": {
            "heldout_before": {"dice": 0.7712},
            "heldout_after": {"dice": 0.8534},
            "reference_before": {"dice": 0.88},
            "reference_after": {"dice": None},
        },
    }
    base = Base(
        "lvunet-kvasir-seg",
        {"dataset": {"name": "kvasir-seg"}, "metrics": {"test": {"dice": 0.8734, "iou": 0.79}}},
        {"licence": "research use"},
    )
    info = describe("lvunet-finetuned-centre-b", metadata, base=base)
    assert info.row("Learnt from") == (
        "fine-tuned from lvunet-kvasir-seg on 4 pairs from 'centre-b' (1 more held out), "
        "held-out Dice 0.771 -> 0.853"
    )  # no reference line: its 'after' was not measured
    assert info.row("Segments").startswith("polyps in colonoscopy images")
    assert info.row("Test") == (
        "Dice 0.873, IoU 0.790: the base model's (lvunet-kvasir-seg), not measured after "
        "fine-tuning"
    )
    assert info.row("Licence") == "derives from lvunet-kvasir-seg: research use"
    # Base not found: no figures borrowed from anywhere.
    alone = describe("x", metadata)
    assert alone.row("Test") == "none recorded (fine-tuned from lvunet-kvasir-seg)"
    assert alone.row("Licence") == "not recorded in the weights"
    assert "Base model learnt from" not in dict(alone.rows)


@pytest.mark.slow
def test_real_finetuned_file_is_described(tmp_path: Path) -> None:
    """A file written by ``python -m training.finetune`` (2 steps on tiny data)."""
    data = tiny_pairs_folder(tmp_path / "centre", n=4, size=64)
    subprocess.run(
        [sys.executable, "-m", "training.finetune", "--data", str(data), "--weights",
         weights.DEFAULT_MODEL, "--out", str(tmp_path / "out"), "--steps", "2",
         "--reference", "none", "--progress", "none", "--device", "cpu"],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    (path,) = (tmp_path / "out").glob("*.safetensors")
    metadata = weights.read_metadata(path)
    info = model_info(path)
    n_train = len(metadata["dataset"]["finetune_images"])
    before = metadata["metrics"]["heldout_before"]["dice"]
    after = metadata["metrics"]["heldout_after"]["dice"]
    assert info.row("Learnt from").startswith(
        f"fine-tuned from {weights.DEFAULT_MODEL} on {n_train} pairs from 'centre'"
    )
    assert f"held-out Dice {before:.3f} -> {after:.3f}" in info.row("Learnt from")
    base_metadata = weights.open_weights(weights.DEFAULT_MODEL).metadata
    assert f"Dice {base_metadata['metrics']['test']['dice']:.3f}" in info.row("Test")
    assert "the base model's" in info.row("Test")
    entry_meta = dict(weights.registry()[weights.DEFAULT_MODEL].meta)
    assert not _unsourced_numbers(info.text, metadata, base_metadata, entry_meta)
