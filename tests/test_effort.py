"""Duplicate-safe saving, correction records and the correction-effort trend (issue 11).

No Qt here except the plot test at the end (marked gui); the saving and the records are
real files in a temporary dataset folder, read back the way training reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from napari_lvunet._annotations import (
    PAIR_SUFFIXES,
    DuplicateImageError,
    image_digest,
    save_for_training,
)

PROVENANCE = {
    "weights_name": "lvunet-kvasir-seg",
    "weights_sha256": "a" * 64,
    "threshold": 0.5,
    "sizing": "auto",
    "output": "labels",
}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative name -> bytes): a snapshot to compare."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _stack(seed: int = 0, n: int = 3, shape: tuple[int, int] = (48, 64)) -> tuple:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (n, *shape, 3), dtype=np.uint8)
    labels = np.zeros((n, *shape), dtype=np.int32)
    labels[:, 10:30, 20:40] = 1
    return image, labels


# ------------------------------------------------------------------ the digest


def test_saved_image_digest_is_the_training_split_digest(tmp_path: Path) -> None:
    """The digest saving compares is the one training's held-out split groups by, for
    every kind of image the widget saves (RGB, RGBA, grey, float)."""
    from training.adapt import content_digest, group_by_content
    from training.data import IMAGE_SUFFIXES, find_pairs

    assert PAIR_SUFFIXES == IMAGE_SUFFIXES
    rng = np.random.default_rng(1)
    cases = {
        "rgb": (rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), True),
        "rgba": (rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), True),
        "grey": (rng.integers(0, 256, (40, 50), dtype=np.uint8), False),
        "float": (rng.normal(size=(40, 50)).astype(np.float32), False),
    }
    for stem, (image, rgb) in cases.items():
        labels = np.zeros(image.shape[:2], np.uint8)
        (item,) = save_for_training(image, labels, tmp_path, stem, rgb=rgb).items
        pixels = np.asarray(PILImage.open(item.image))
        assert content_digest(item.image) == image_digest(pixels)
        record = json.loads(item.record.read_text())
        assert record["image_digest"] == content_digest(item.image)
    assert len(group_by_content(find_pairs(tmp_path))) == 4


# ------------------------------------------------------------- duplicate-safe saving


def test_same_image_again_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    image, labels = _stack()
    first = save_for_training(image, labels, tmp_path, "scan", rgb=True)
    assert [i.status for i in first.items] == ["written"] * 3
    before = _files(tmp_path)

    changed = labels.copy()
    changed[1, 0:5, 0:5] = 1
    # Under another name too: the content decides, not the file name.
    with pytest.raises(DuplicateImageError, match=r"slice z001 .*images/scan_z001\.png") as err:
        save_for_training(image, changed, tmp_path, "renamed", rgb=True)
    assert [(i, p.name) for i, p, _ in err.value.duplicates] == [((1,), "scan_z001.png")]
    assert isinstance(err.value, ValueError)
    assert _files(tmp_path) == before  # not a file more, none changed

    # A new slice together with a clashing one: still nothing at all.
    other, _ = _stack(seed=9, n=1)
    mixed = np.concatenate([image[1:2], other])
    with pytest.raises(DuplicateImageError):
        save_for_training(mixed, changed[[1, 0]], tmp_path, "mixed", rgb=True)
    assert _files(tmp_path) == before


def test_same_image_and_mask_again_is_unchanged(tmp_path: Path) -> None:
    image, labels = _stack()
    save_for_training(image, labels, tmp_path, "scan", rgb=True)
    before = _files(tmp_path)
    again = save_for_training(image, labels, tmp_path, "scan", rgb=True, duplicates="update")
    assert [i.status for i in again.items] == ["unchanged"] * 3
    assert [p.name for p, _ in again] == ["scan_z000.png", "scan_z001.png", "scan_z002.png"]
    assert "3 unchanged" in again.summary()
    assert _files(tmp_path) == before


def test_update_replaces_the_mask_and_keeps_the_old_one(tmp_path: Path) -> None:
    from training.data import find_pairs, load_pair

    image, labels = _stack()
    proposals = {(1,): labels[1] > 0}
    save_for_training(
        image, labels, tmp_path, "scan", rgb=True, proposals=proposals, provenance=PROVENANCE
    )
    old_mask = (tmp_path / "masks" / "scan_z001.png").read_bytes()
    old_record = (tmp_path / "records" / "scan_z001.json").read_bytes()
    old_proposal = (tmp_path / "proposals" / "scan_z001.png").read_bytes()

    changed = labels.copy()
    changed[1, 0:5, 0:5] = 1
    result = save_for_training(
        image, changed, tmp_path, "scan", rgb=True, duplicates="update", slices=[(1,), (2,)]
    )
    assert [i.status for i in result.items] == ["updated", "unchanged"]
    assert "1 existing pair(s) updated (scan_z001.png" in result.summary()
    (updated, _) = result.items
    np.testing.assert_array_equal(np.asarray(PILImage.open(updated.mask)), (changed[1] > 0) * 255)

    history = updated.history
    assert history is not None and history.parent == tmp_path / "history"
    assert (history / "masks" / "scan_z001.png").read_bytes() == old_mask
    assert (history / "records" / "scan_z001.json").read_bytes() == old_record
    assert (history / "proposals" / "scan_z001.png").read_bytes() == old_proposal
    record = json.loads(updated.record.read_text())
    assert record["previous"] == history.relative_to(tmp_path).as_posix()
    # This save had no proposal: the record says unknown, the old proposal is history.
    assert record["dice"] is None and record["pixels_added"] is None
    assert not (tmp_path / "proposals" / "scan_z001.png").exists()

    # Training sees three pairs, the new mask, and none of the other folders.
    pairs = find_pairs(tmp_path)
    assert [p.stem for p in pairs] == ["scan_z000", "scan_z001", "scan_z002"]
    _, mask = load_pair(pairs[1])
    np.testing.assert_array_equal(mask, changed[1] > 0)

    # A second update keeps the first update's mask in a history folder of its own.
    again = changed.copy()
    again[1, 40:, 60:] = 1
    second = save_for_training(
        image, again, tmp_path, "scan", rgb=True, duplicates="update", slices=[(1,)]
    )
    assert second.items[0].history not in (None, history)
    kept = np.asarray(PILImage.open(second.items[0].history / "masks" / "scan_z001.png"))
    np.testing.assert_array_equal(kept, (changed[1] > 0) * 255)
    assert (history / "masks" / "scan_z001.png").read_bytes() == old_mask


def test_update_of_a_pair_with_a_tiff_mask_leaves_one_mask(tmp_path: Path) -> None:
    """A pair put into the folder by hand (TIFF image, TIFF mask) is found by content;
    its update writes a PNG mask and keeps the TIFF in history, so training still finds
    exactly one mask for the stem."""
    from training.data import find_pairs

    image, labels = _stack(n=1)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    PILImage.fromarray(image[0]).save(tmp_path / "images" / "hand.tif")
    PILImage.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "masks" / "hand.tif")
    with pytest.raises(DuplicateImageError, match=r"images/hand\.tif"):
        save_for_training(image[0], labels[0], tmp_path, "again", rgb=True)
    result = save_for_training(
        image[0], labels[0], tmp_path, "again", rgb=True, duplicates="update"
    )
    (item,) = result.items
    assert item.status == "updated" and item.mask == tmp_path / "masks" / "hand.png"
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["hand.png"]
    assert (item.history / "masks" / "hand.tif").is_file()
    assert [p.stem for p in find_pairs(tmp_path)] == ["hand"]


def test_update_keeps_every_mask_of_the_stem_in_history(tmp_path: Path) -> None:
    """images/foo.png with both masks/foo.jpg and masks/foo.png: an update writes
    masks/foo.png, so both old masks go to history first; none is lost."""
    from training.data import find_pairs

    image, labels = _stack(n=1)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    PILImage.fromarray(image[0]).save(tmp_path / "images" / "foo.png")
    jpg_mask = np.zeros((48, 64), np.uint8)
    jpg_mask[0:20, 0:20] = 255
    png_mask = np.zeros((48, 64), np.uint8)
    png_mask[30:, 40:] = 255
    PILImage.fromarray(jpg_mask).save(tmp_path / "masks" / "foo.jpg")
    PILImage.fromarray(png_mask).save(tmp_path / "masks" / "foo.png")
    old = {name: (tmp_path / "masks" / name).read_bytes() for name in ("foo.jpg", "foo.png")}

    result = save_for_training(image[0], labels[0], tmp_path, "x", rgb=True, duplicates="update")
    (item,) = result.items
    assert item.status == "updated" and item.mask == tmp_path / "masks" / "foo.png"
    kept = {p.name: p.read_bytes() for p in (item.history / "masks").iterdir()}
    assert kept == old
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["foo.png"]
    np.testing.assert_array_equal(np.asarray(PILImage.open(item.mask)), (labels[0] > 0) * 255)
    assert [p.stem for p in find_pairs(tmp_path)] == ["foo"]


def test_a_save_failing_part_way_leaves_the_folder_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """Whichever write of a save fails (a new pair's image, mask, record or proposal, a
    history copy, an updated mask or record), everything the save wrote, replaced or
    removed before it is undone: the folder is byte for byte what it was."""
    import shutil

    from napari_lvunet import _annotations

    image, labels = _stack(n=3)
    proposals = {(i,): labels[i] > 0 for i in range(3)}
    start = tmp_path / "start"
    save_for_training(
        image[:2], labels[:2], start, "scan", rgb=True, proposals=proposals, provenance=PROVENANCE
    )
    (start / "masks" / "scan_z001.tif").write_bytes(
        (start / "masks" / "scan_z001.png").read_bytes()
    )
    changed = labels.copy()
    changed[:, 0:5, 0:5] = 1  # slices 0 and 1 update their pairs, slice 2 is new
    before = _files(start)

    real = _annotations.atomic_write
    calls: list[Path] = []

    def counting(path, writer, **kw):
        calls.append(Path(path))
        return real(path, writer, **kw)

    monkeypatch.setattr(_annotations, "atomic_write", counting)
    done = tmp_path / "done"
    shutil.copytree(start, done)
    save_for_training(
        image, changed, done, "scan", rgb=True, duplicates="update", proposals=proposals
    )
    n_writes = len(calls)
    assert n_writes > 10 and calls[-1].name == _annotations.DIGESTS_FILE
    assert not (done / "masks" / "scan_z001.tif").exists()

    for fail_at in range(1, n_writes):  # the last write is the index: only a cache
        calls.clear()

        def failing(path, writer, fail_at=fail_at, **kw):
            calls.append(Path(path))
            if len(calls) == fail_at:
                raise OSError(f"disk full writing {Path(path).name}")
            return real(path, writer, **kw)

        monkeypatch.setattr(_annotations, "atomic_write", failing)
        folder = tmp_path / f"fail{fail_at}"
        shutil.copytree(start, folder)
        with pytest.raises(OSError, match="disk full") as info:
            save_for_training(
                image, changed, folder, "scan", rgb=True, duplicates="update", proposals=proposals
            )
        assert _files(folder) == before, f"write {fail_at} ({calls[-1]}) failed"
        assert type(info.value) is OSError  # the writer's own error: nothing left written
        assert not (folder / "history").exists()

    # The disk stays full: the updated masks cannot be put back. The error says which.
    full = [False]

    def full_from_the_new_pair(path, writer, **kw):
        full[0] = full[0] or Path(path).parent.name == "images"
        if full[0]:
            raise OSError("disk full")
        return real(path, writer, **kw)

    monkeypatch.setattr(_annotations, "atomic_write", full_from_the_new_pair)
    folder = tmp_path / "full"
    shutil.copytree(start, folder)
    with pytest.raises(_annotations.PartialSaveError, match="could not be undone") as info:
        save_for_training(
            image, changed, folder, "scan", rgb=True, duplicates="update", proposals=proposals
        )
    left = {p.relative_to(folder).as_posix() for p in info.value.left}
    assert {"masks/scan_z000.png", "masks/scan_z001.png", "records/scan_z001.json"} <= left
    assert "masks/scan_z001.png" in str(info.value)
    (history,) = (folder / "history").iterdir()  # what could not be put back is kept
    for name in ("scan_z000.png", "scan_z001.png", "scan_z001.tif"):
        assert (history / "masks" / name).read_bytes() == before[f"masks/{name}"]


def test_one_image_twice_in_one_save_is_one_pair(tmp_path: Path) -> None:
    image, labels = _stack()
    image[2] = image[0]  # a video that holds the same frame twice
    result = save_for_training(image, labels, tmp_path, "clip", rgb=True)
    assert [i.slices for i in result.items] == [((0,), (2,)), ((1,),)]
    assert len(list((tmp_path / "images").iterdir())) == 2

    labels[2, 0:3, 0:3] = 1  # the same frame with two different masks: which one?
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="slice z000 and slice z002 show the same image"):
        save_for_training(image, labels, other, "clip", rgb=True)
    assert not other.exists()


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Start a new napari session (no digests in memory) and record every image decoded."""
    from napari_lvunet import _annotations

    decoded: list[str] = []
    real = _annotations.read_image

    def counting(path, **kw):
        decoded.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(_annotations, "read_image", counting)
    _annotations._DIGESTS.clear()
    return decoded


def test_a_new_session_does_not_decode_the_saved_images_again(tmp_path: Path, monkeypatch) -> None:
    """The digests are kept beside the dataset (hidden from training); an image changed
    by hand since is decoded again, and only that one; a damaged index is rebuilt."""
    from napari_lvunet import _annotations

    image, labels = _stack(n=4)
    save_for_training(image[:3], labels[:3], tmp_path, "scan", rgb=True)
    index = tmp_path / _annotations.DIGESTS_FILE
    assert sorted(json.loads(index.read_text())) == [f"scan_z00{i}.png" for i in range(3)]

    decoded = _count_decodes(monkeypatch)  # in a new napari session
    save_for_training(image[3], labels[3], tmp_path, "new", rgb=True)
    assert decoded == []

    other = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    PILImage.fromarray(other).save(tmp_path / "images" / "scan_z001.png")  # by hand
    _annotations._DIGESTS.clear()
    with pytest.raises(DuplicateImageError, match="scan_z001"):
        save_for_training(other, np.zeros((48, 64)), tmp_path, "other", rgb=True)
    assert decoded == ["scan_z001.png", "scan_z001.png"]  # its digest, then its mask

    index.write_text("{damaged")
    decoded.clear()
    _annotations._DIGESTS.clear()
    save_for_training(image[0], labels[0], tmp_path, "again", rgb=True)  # unchanged
    assert sorted(set(decoded)) == ["new.png", "scan_z000.png", "scan_z001.png", "scan_z002.png"]
    assert len(json.loads(index.read_text())) == 4


def test_an_image_replaced_with_its_time_restored_is_decoded_again(
    tmp_path: Path,
) -> None:
    """images/x.tif replaced by another picture of the same byte size, its modification
    time put back (cp -p, rsync -a, unpacking): a new session must see the new picture,
    not the digest the index kept for the old one, or an update pairs the wrong image."""
    import os
    import time

    from napari_lvunet import _annotations

    rng = np.random.default_rng(7)
    old, new = (rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2))
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    x = tmp_path / "images" / "x.tif"
    PILImage.fromarray(old).save(x)  # uncompressed: any 48x64 RGB picture has this size
    PILImage.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "masks" / "x.tif")
    other_image, other_labels = _stack(seed=3, n=1)
    save_for_training(other_image[0], other_labels[0], tmp_path, "other", rgb=True)
    index = json.loads((tmp_path / _annotations.DIGESTS_FILE).read_text())
    assert index["x.tif"][-1] == image_digest(old)

    st = x.stat()
    time.sleep(0.05)  # past the file system's clock tick
    PILImage.fromarray(new).save(x)  # in place, as cp -p does
    os.utime(x, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert x.stat().st_size == st.st_size and x.stat().st_mtime_ns == st.st_mtime_ns
    _annotations._DIGESTS.clear()  # a new napari session

    mask = np.zeros((48, 64), np.uint8)
    mask[5:9, 5:9] = 1
    # The old picture is no longer in the dataset: a new pair, not an update of x.tif.
    (item,) = save_for_training(old, mask, tmp_path, "old", rgb=True).items
    assert item.status == "written" and item.image.name == "old.png"
    # The new picture is x.tif's, saved with another mask.
    with pytest.raises(DuplicateImageError, match=r"images/x\.tif"):
        save_for_training(new, mask, tmp_path, "new", rgb=True)
    index = json.loads((tmp_path / _annotations.DIGESTS_FILE).read_text())
    assert index["x.tif"][-1] == image_digest(new)


def test_a_refused_save_keeps_the_digests_it_computed(tmp_path: Path, monkeypatch) -> None:
    """A save refused as a duplicate has decoded the dataset's images: it writes the
    index before raising, so the next session (the user's second try) decodes nothing."""
    from napari_lvunet import _annotations

    image, labels = _stack()
    save_for_training(image, labels, tmp_path, "scan", rgb=True)
    index = tmp_path / _annotations.DIGESTS_FILE
    index.unlink()  # e.g. a dataset copied without its hidden files
    _annotations._DIGESTS.clear()
    changed = labels.copy()
    changed[0, 0:4, 0:4] = 1
    with pytest.raises(DuplicateImageError):
        save_for_training(image[0], changed[0], tmp_path, "scan", rgb=True)
    assert sorted(json.loads(index.read_text())) == [f"scan_z00{i}.png" for i in range(3)]

    decoded = _count_decodes(monkeypatch)  # in a new napari session
    with pytest.raises(DuplicateImageError):
        save_for_training(image[0], changed[0], tmp_path, "scan", rgb=True)
    assert decoded == ["scan_z000.png"]  # only the clashing pair's mask, to compare


# ------------------------------------------------------------------ the records


def test_records_count_the_pixels_corrected_by_hand(tmp_path: Path) -> None:
    image, _ = _stack(n=2)
    proposal = np.zeros((48, 64), bool)
    proposal[10:30, 20:40] = True  # 400 pixels
    corrected = proposal.copy()
    corrected[10:30, 20:25] = False  # 100 removed
    corrected[0:4, 0:10] = True  # 40 added
    labels = np.stack([corrected, corrected]).astype(np.uint8)
    result = save_for_training(
        image,
        labels,
        tmp_path,
        "case",
        rgb=True,
        proposals={(0,): proposal},  # slice 1 was not made by the model
        provenance=PROVENANCE,
    )
    first = json.loads(result.items[0].record.read_text())
    assert first["pixels_added"] == 40 and first["pixels_removed"] == 100
    assert first["foreground"] == 340 and first["pixels"] == 48 * 64
    assert first["dice"] == pytest.approx(2 * 300 / (400 + 340), rel=1e-12)
    assert first["slice"] == [0] and first["image"] == "images/case_z000.png"
    assert first["proposal"] == "proposals/case_z000.png"
    for key, value in PROVENANCE.items():
        assert first[key] == value
    assert first["time"].endswith("+00:00")
    saved = np.asarray(PILImage.open(tmp_path / first["proposal"]))
    np.testing.assert_array_equal(saved, proposal * 255)

    second = json.loads(result.items[1].record.read_text())
    assert second["pixels_added"] is None and second["pixels_removed"] is None
    assert second["dice"] is None and second["proposal"] is None
    assert second["foreground"] == 340  # what is known is still recorded
    assert result.items[1].proposal is None
    assert not (tmp_path / "proposals" / "case_z001.png").exists()


def test_records_take_each_slices_own_model_run(tmp_path: Path) -> None:
    """A stack segmented slice by slice, with two models: each record names its own."""
    image, labels = _stack(n=3)
    image[2] = image[0]  # slice 2 repeats slice 0, and only slice 2 has a proposal
    tuned = {**PROVENANCE, "weights_name": "my-tune", "weights_sha256": "b" * 64}
    result = save_for_training(
        image,
        labels,
        tmp_path,
        "clip",
        rgb=True,
        proposals={(1,): labels[1] > 0, (2,): labels[2] > 0},
        provenance={(1,): PROVENANCE, (2,): tuned},
    )
    first, second = (json.loads(item.record.read_text()) for item in result.items)
    assert (first["slice"], first["weights_name"], first["dice"]) == ([2], "my-tune", 1.0)
    assert (second["slice"], second["weights_name"]) == ([1], PROVENANCE["weights_name"])


def test_dice_of_two_empty_masks_is_one_and_bad_proposals_are_refused(tmp_path: Path) -> None:
    image = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    empty = np.zeros((32, 32), np.uint8)
    (item,) = save_for_training(
        image, empty, tmp_path, "blank", rgb=False, proposals={(): empty > 0}
    ).items
    record = json.loads(item.record.read_text())
    assert record["dice"] == 1.0 and record["pixels_added"] == record["pixels_removed"] == 0

    other = tmp_path / "other"
    with pytest.raises(ValueError, match="proposal of the image has shape"):
        save_for_training(image, empty, other, "x", rgb=False, proposals={(): np.zeros((8, 8))})
    with pytest.raises(ValueError, match="duplicates must be one of"):
        save_for_training(image, empty, other, "x", rgb=False, duplicates="merge")
    assert not other.exists()


def test_new_pairs_never_take_a_name_a_record_holds(tmp_path: Path) -> None:
    """A record left behind by a pair removed by hand is never overwritten by a new pair."""
    image, labels = _stack(n=1)
    (tmp_path / "records").mkdir()
    stale = tmp_path / "records" / "scan.json"
    stale.write_text('{"left": "by hand"}')
    (item,) = save_for_training(image[0], labels[0], tmp_path, "scan", rgb=True).items
    assert item.image.name == "scan-2.png" and item.record.name == "scan-2.json"
    assert stale.read_text() == '{"left": "by hand"}'


# ------------------------------------------------------------------ the effort trend


def _three_versions(tmp_path: Path) -> tuple[Path, str]:
    """A dataset saved from the bundled model, a fine-tune and no model (in that order).

    The bundled model's pairs: Dice 1.0 and 0.5; the fine-tune's: 0.8; the third pair
    was drawn without a proposal.
    """
    from napari_lvunet import versions

    bundled = versions.list_versions()[0]
    data = tmp_path / "data"
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    corrected = np.zeros((40, 40), bool)
    corrected[0:10, 0:10] = True  # 100 pixels
    half = np.zeros((40, 40), bool)
    half[0:10, 0:10] = True
    half[20:30, 20:30] = True  # proposes 200, 100 of them right: Dice 2*100/300
    six = np.zeros((40, 40), bool)
    six[0:10, 0:6] = True  # proposes 60 of the 100: Dice 2*60/160 = 0.75
    labels = np.stack([corrected] * 4).astype(np.uint8)
    first = {"weights_name": bundled.name, "weights_sha256": bundled.sha256, "threshold": 0.5}
    save_for_training(
        images[:2], labels[:2], data, "a", rgb=True,
        proposals={(0,): corrected, (1,): half}, provenance=first,
    )  # fmt: skip
    tuned = {"weights_name": "my-tune", "weights_sha256": "b" * 64, "threshold": 0.4}
    save_for_training(
        images[2], labels[2], data, "b", rgb=True, proposals={(): six}, provenance=tuned
    )
    save_for_training(images[3], labels[3], data, "c", rgb=True)
    return data, bundled.name


def test_trend_per_model_version_in_order_of_first_use(tmp_path: Path, monkeypatch) -> None:
    from napari_lvunet import effort

    monkeypatch.setenv("NAPARI_LVUNET_MODELS", str(tmp_path / "models"))
    data, bundled = _three_versions(tmp_path)
    rows = effort.read_records(data)
    assert [r.image for r in rows] == [
        "images/a_z000.png",
        "images/a_z001.png",
        "images/b.png",
        "images/c.png",
    ]
    trends = effort.trend(rows)
    assert [(t.label, t.pairs, t.scored) for t in trends] == [
        (bundled, 2, 2),  # named through versions.list_versions()
        ("my-tune", 1, 1),  # not a registered version: its weights name
        (effort.NO_MODEL, 1, 0),
    ]
    assert trends[0].mean_dice == pytest.approx((1.0 + 200 / 300) / 2, rel=1e-12)
    assert trends[1].mean_dice == pytest.approx(0.75, rel=1e-12)
    assert trends[2].mean_dice is None
    table = effort.trend_table(trends)
    assert "0.833" in table and "0.750" in table and effort.NO_MODEL in table


def test_effort_csv_has_the_recorded_pixels(tmp_path: Path, monkeypatch) -> None:
    import csv

    from napari_lvunet import effort

    monkeypatch.setenv("NAPARI_LVUNET_MODELS", str(tmp_path / "models"))
    data, bundled = _three_versions(tmp_path)
    out = effort.write_csv(data, tmp_path / "effort.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == effort.CSV_COLUMNS
    assert [r["version"] for r in rows] == [bundled, bundled, "my-tune", effort.NO_MODEL]
    assert [r["slice"] for r in rows] == ["z000", "z001", "", ""]
    for row in rows:
        record = json.loads((data / row["record"]).read_text())
        for key in ("pixels_added", "pixels_removed", "foreground", "pixels"):
            assert row[key] == ("" if record[key] is None else str(record[key]))
        assert row["dice"] == ("" if record["dice"] is None else repr(record["dice"]))
    assert rows[1]["pixels_added"] == "0" and rows[1]["pixels_removed"] == "100"
    assert rows[2]["pixels_added"] == "40" and rows[2]["pixels_removed"] == "0"
    assert rows[3]["dice"] == rows[3]["pixels_added"] == rows[3]["proposal"] == ""
    with pytest.raises(FileExistsError):
        effort.write_csv(data, out)
    effort.write_csv(data, out, overwrite=True)


def test_malformed_records_are_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    from napari_lvunet import effort

    data, _ = _three_versions(tmp_path)
    good = sorted((data / "records").glob("*.json"))
    bad = {
        "broken.json": "{not json",
        "list.json": "[1, 2]",
        "other.json": json.dumps({"format": "something-else", "time": "x"}),
        "dice.json": json.dumps({**json.loads(good[0].read_text()), "dice": 2.0}),
        "count.json": json.dumps({**json.loads(good[0].read_text()), "pixels_added": "40"}),
        "binary.json": b"\xff\xfe\x00".decode("latin-1"),
    }
    for name, text in bad.items():
        (data / "records" / name).write_text(text, encoding="latin-1")
    with caplog.at_level("WARNING", logger="napari_lvunet.effort"):
        rows = effort.read_records(data)
    assert sorted(r.record for r in rows) == good
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in bad:
        assert name in warned
    assert effort.read_records(tmp_path / "nowhere") == []


def test_effort_command_line_without_napari_or_torch(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    data, bundled = _three_versions(tmp_path)
    env = {**os.environ, "NAPARI_LVUNET_MODELS": str(tmp_path / "models")}
    out = tmp_path / "effort.csv"
    probe = (
        "import sys; from napari_lvunet.effort import main; rc = main(sys.argv[1:]); "
        "assert not {'torch', 'qtpy', 'napari'} & set(sys.modules), 'heavy import'; "
        "sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(data), "--csv", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "version"]
    assert lines[1].startswith(bundled) and "0.833" in lines[1]
    assert lines[2].startswith("my-tune") and "0.750" in lines[2]
    assert out.is_file() and f"wrote 4 row(s) to {out}" in done.stdout

    again = subprocess.run(
        [sys.executable, "-m", "napari_lvunet.effort", str(data), "--csv", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert again.returncode == 2 and "--overwrite" in again.stderr


# ------------------------------------------------------------------ the plot


def _rgb(image, x: float, y: float) -> tuple[int, int, int]:
    colour = image.pixelColor(round(x), round(y))
    return colour.red(), colour.green(), colour.blue()


def _colour(name: str) -> tuple[int, int, int]:
    from qtpy.QtGui import QColor

    colour = QColor(name)
    return colour.red(), colour.green(), colour.blue()


def _count(image, rgb: tuple[int, int, int]) -> int:
    return sum(
        _rgb(image, x, y) == rgb for x in range(image.width()) for y in range(image.height())
    )


@pytest.mark.gui
def test_effort_plot_draws_each_pair_in_its_version_colour(tmp_path: Path, qtbot) -> None:
    from napari_lvunet._effort_plot import VERSION_COLOURS, EffortPlot

    data, bundled = _three_versions(tmp_path)
    first, second = _colour(VERSION_COLOURS[0]), _colour(VERSION_COLOURS[1])
    plot = EffortPlot()
    qtbot.addWidget(plot)
    plot.resize(320, 120)
    plot.refresh(None)
    empty = plot.grab().toImage()
    assert _count(empty, first) == _count(empty, second) == 0

    plot.refresh(data)
    image = plot.grab().toImage()
    assert image.height() == 120
    # The bundled model's pairs (Dice 1 and 2/3), then the fine-tune's (0.75).
    for position, dice, rgb in ((0, 1.0, first), (1, 200 / 300, first), (2, 0.75, second)):
        point = plot.point_at(position, dice)
        assert _rgb(image, point.x(), point.y()) == rgb, (position, dice)
    # Nowhere else in the plot column of a dot: the bundled model never scored 0.25.
    low = plot.point_at(0, 0.25)
    assert _rgb(image, low.x(), low.y()) != first
    # Each version's mean (5/6 for the bundled model) is a line across its dots.
    mean_y = plot.point_at(0, 5 / 6).y()
    between = (plot.point_at(0, 0).x() + plot.point_at(1, 0).x()) / 2
    assert _rgb(image, between, mean_y) == first
    assert _rgb(image, between, plot.point_at(0, 0.5).y()) != first
    # The legend names both versions; the pair without a proposal is not a dot.
    assert [s[0] for s in plot.series] == [bundled, "my-tune"]
    assert [len(s[2]) for s in plot.series] == [2, 1]
    assert "1 pair(s) saved without a model proposal" in plot.toolTip()
