"""Model versions (napari_lvunet.versions): real weights files in a real models folder,
read back by a fresh interpreter as a new napari session would."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_lvunet import versions
from napari_lvunet.weights import DEFAULT_MODEL, file_sha256, registry

SIZE = 128


def _weights(path: Path, seed: int, *, with_pt: bool = False) -> Path:
    """A fused LV-UNet written as a fine-tune writes it (metadata included)."""
    import torch

    from napari_lvunet.model import LVUNet
    from napari_lvunet.weights import save_weights

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(
        LVUNet(1, fused=True),
        path,
        {
            "train_size": [SIZE, SIZE],
            "dataset": {"name": "c", "finetune_images": ["a", "b", "c"], "heldout_images": ["d"]},
            "base_weights": {"name": DEFAULT_MODEL, "sha256": "ab" * 32},
            "finetune": {"steps": 3},
            "metrics": {"heldout_before": {"dice": 0.5}, "heldout_after": {"dice": 0.75}},
        },
    )
    if with_pt:
        path.with_suffix(".pt").write_bytes(b"an unfused checkpoint " + bytes([seed]))
    return path


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    models = tmp_path / "models"
    monkeypatch.setenv(versions.MODELS_ENV, str(models))
    return models


def test_models_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(versions.MODELS_ENV, str(tmp_path / "m"))
    assert versions.models_dir() == tmp_path / "m"
    monkeypatch.delenv(versions.MODELS_ENV)
    monkeypatch.setenv("NAPARI_LVUNET_CACHE", str(tmp_path / "cache"))
    assert versions.models_dir() == tmp_path / "cache" / "models"


def test_register_copies_records_and_lists_after_the_bundled_model(
    folder: Path, tmp_path: Path
) -> None:
    source = _weights(tmp_path / "out" / "lvunet-finetuned-c.safetensors", 1, with_pt=True)
    v = versions.register(
        source, data_folder=tmp_path / "c", reference_dice=(0.85, 0.84), name="centre B"
    )
    assert v.id == "lvunet-finetuned-c" and v.name == "centre B"
    assert Path(v.weights) == folder / "lvunet-finetuned-c.safetensors"
    assert file_sha256(v.weights) == file_sha256(source) == v.sha256
    assert (folder / "lvunet-finetuned-c.pt").read_bytes() == source.with_suffix(".pt").read_bytes()
    assert v.pairs == 4  # training + held-out images of the metadata
    assert v.heldout_dice == {"before": 0.5, "after": 0.75}
    assert v.reference_dice == {"before": 0.85, "after": 0.84}
    assert v.base == {"name": DEFAULT_MODEL, "sha256": "ab" * 32}
    assert v.data_folder == str((tmp_path / "c").resolve())
    listed = versions.list_versions()
    assert [x.id for x in listed] == [DEFAULT_MODEL, v.id]
    assert listed[0].bundled and listed[0].sha256 == registry()[DEFAULT_MODEL].sha256
    assert listed[1] == v


def test_nothing_is_overwritten(folder: Path, tmp_path: Path) -> None:
    first = _weights(tmp_path / "a" / "same.safetensors", 1)
    second = _weights(tmp_path / "b" / "same.safetensors", 2)
    v1 = versions.register(first)
    kept = (folder / "same.safetensors").read_bytes()
    v2 = versions.register(second)
    assert (v1.id, v2.id) == ("same", "same-2")
    assert (folder / "same.safetensors").read_bytes() == kept
    assert file_sha256(v2.weights) == file_sha256(second) != v1.sha256
    # A file someone else put there (no sidecar) keeps its name and bytes too.
    (folder / "other.safetensors").write_bytes(b"not ours")
    v3 = versions.register(_weights(tmp_path / "c" / "other.safetensors", 3))
    assert v3.id == "other-2" and (folder / "other.safetensors").read_bytes() == b"not ours"


def test_versions_persist_and_select_revert_delete_across_processes(
    folder: Path, tmp_path: Path
) -> None:
    v1 = versions.register(_weights(tmp_path / "x" / "one.safetensors", 1))
    v2 = versions.register(_weights(tmp_path / "x" / "two.safetensors", 2))
    assert versions.current().id == DEFAULT_MODEL  # nothing selected yet
    versions.select(v2.id)
    code = (
        "import json\n"
        "from napari_lvunet import versions as v\n"
        "print(json.dumps({'ids': [x.id for x in v.list_versions()], 'current': v.current().id,"
        " 'torch': __import__('sys').modules.get('torch') is not None}))\n"
    )
    env = {**os.environ, versions.MODELS_ENV: str(folder)}

    def session() -> dict:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    seen = session()
    assert seen == {"ids": [DEFAULT_MODEL, v1.id, v2.id], "current": v2.id, "torch": False}
    versions.select(v1.id)  # go back one version
    assert session()["current"] == v1.id
    versions.select(DEFAULT_MODEL)  # and back to the bundled model
    assert session()["current"] == DEFAULT_MODEL
    versions.select(v2.id)
    versions.delete(v2.id)
    assert not any(folder.glob("two.*"))
    assert session() == {"ids": [DEFAULT_MODEL, v1.id], "current": DEFAULT_MODEL, "torch": False}
    with pytest.raises(versions.VersionError, match="bundled"):
        versions.delete(DEFAULT_MODEL)
    with pytest.raises(versions.VersionError, match="no model version"):
        versions.select("two")


def test_broken_records_are_skipped_not_touched(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = versions.register(_weights(tmp_path / "x" / "good.safetensors", 1))
    (folder / "garbage.json").write_text("{not json")
    (folder / "list.json").write_text("[1, 2]")
    record = json.loads((folder / "good.json").read_text())
    (folder / "escape.json").write_text(json.dumps({**record, "weights": "../good.safetensors"}))
    gone = versions.register(_weights(tmp_path / "x" / "gone.safetensors", 2))
    Path(gone.weights).unlink()
    with caplog.at_level("WARNING", logger="napari_lvunet.versions"):
        ids = [v.id for v in versions.list_versions()]
    assert ids == [DEFAULT_MODEL, good.id]
    assert (folder / "garbage.json").read_text() == "{not json"
    assert {"garbage.json", "list.json", "escape.json", "gone.json"} <= {
        Path(r.getMessage().split()[4].rstrip(":")).name for r in caplog.records
    }


def test_unusable_weights_are_refused_and_nothing_is_written(folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(versions.VersionError, match="cannot register"):
        versions.register(bad)
    with pytest.raises(versions.VersionError, match="reference_dice"):
        versions.register(_weights(tmp_path / "w.safetensors", 1), reference_dice=("x", 1))
    assert not folder.exists() or not any(folder.iterdir())


def test_reference_dice_defaults_to_the_metadata_and_delete_falls_back_quietly(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from napari_lvunet.model import LVUNet
    from napari_lvunet.weights import save_weights

    torch.manual_seed(4)
    source = tmp_path / "out" / "scored.safetensors"
    source.parent.mkdir()
    metrics = {
        "heldout_before": {"dice": 0.5},
        "heldout_after": {"dice": 0.75},
        "reference_before": {"dice": 0.85},
        "reference_after": {"dice": 0.8125},
    }
    save_weights(LVUNet(1, fused=True), source, {"train_size": [SIZE, SIZE], "metrics": metrics})
    v = versions.register(source)
    assert v.reference_dice == {"before": 0.85, "after": 0.8125}
    assert v.heldout_dice == {"before": 0.5, "after": 0.75}
    assert versions.register(source, reference_dice=(0.1, 0.2)).reference_dice == {
        "before": 0.1,
        "after": 0.2,
    }
    versions.select(v.id)
    caplog.clear()  # the INFO lines of the saves above, kept when the suite logs INFO
    with caplog.at_level("WARNING", logger="napari_lvunet.versions"):
        versions.delete(v.id)
        assert versions.current().id == DEFAULT_MODEL
    # The choice went back to the bundled model, with no warning.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert json.loads((folder / "current.json").read_text()) == {"current": DEFAULT_MODEL}
