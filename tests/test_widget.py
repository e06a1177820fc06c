"""The dock widget and its Qt-free logic (``_annotations``).

GUI tests use a real napari viewer (pytest-qt's ``make_napari_viewer``) and run under
Xvfb: ``xvfb-run -a pytest tests/test_widget.py``. Models are random fused LV-UNets saved to
``tmp_path``; images are 128-256 px, so every segmentation takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from napari_lvunet._annotations import (
    edited_slices,
    finetune_command,
    layer_axes,
    safe_stem,
    save_for_training,
    slice_stem,
)

# ------------------------------------------------------------------ no Qt needed


@pytest.mark.parametrize(
    ("ndim", "rgb", "axes"),
    [(2, False, "YX"), (2, True, "YXC"), (3, False, "ZYX"), (3, True, "ZYXC"), (4, False, "TZYX")],
)
def test_layer_axes(ndim: int, rgb: bool, axes: str) -> None:
    assert layer_axes(ndim, rgb) == axes


def test_layer_axes_rejects_5d() -> None:
    with pytest.raises(ValueError, match="5 spatial dimensions"):
        layer_axes(5, False)


def test_stems() -> None:
    assert safe_stem("polyp stack [1]") == "polyp_stack_1"
    assert safe_stem("***") == "image"
    assert slice_stem("scan", ()) == "scan"
    assert slice_stem("scan", (3,)) == "scan_z003"
    assert slice_stem("movie", (1, 12)) == "movie_t001_z012"
    assert finetune_command("/data/my folder", "w.safetensors") == (
        "python -m training.finetune --data '/data/my folder' --weights w.safetensors"
    )


def test_edited_slices_from_napari_history_atoms() -> None:
    from napari.layers.labels.labels import _MaskedPaintAtom

    masked = _MaskedPaintAtom(
        slice_key=(slice(2, 4), slice(0, 5), slice(1, 3)),
        mask=None,
        old_values=np.zeros((2, 5, 2)),
        new_value=1,
    )
    fancy = ((np.array([7, 7, 9]), np.array([0, 1, 2]), np.array([0, 0, 0])), np.zeros(3), 1)
    assert edited_slices([masked, fancy], 1) == {(2,), (3,), (7,), (9,)}
    assert edited_slices([fancy], 0) == {()}
    assert edited_slices([masked], 2) == {(2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (3, 0),
                                          (3, 1), (3, 2), (3, 3), (3, 4)}  # fmt: skip


def test_save_for_training_stack_pairs_never_overwrite(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 64, 80, 3), dtype=np.uint8)
    labels = np.zeros((3, 64, 80), dtype=np.int32)
    labels[1, 10:20, 30:50] = 2  # an instance label: any non-zero is foreground
    pairs = save_for_training(image, labels, tmp_path, "scan", rgb=True)
    assert [p.name for p, _ in pairs] == ["scan_z000.png", "scan_z001.png", "scan_z002.png"]
    for z, (img_path, mask_path) in enumerate(pairs):
        assert mask_path == tmp_path / "masks" / img_path.name
        np.testing.assert_array_equal(np.asarray(PILImage.open(img_path)), image[z])
        np.testing.assert_array_equal(np.asarray(PILImage.open(mask_path)), (labels[z] > 0) * 255)
    before = {p: p.read_bytes() for p in (tmp_path / "images").iterdir()}

    again = save_for_training(image[:, ::-1], labels, tmp_path, "scan", rgb=True, slices=[(1,)])
    assert [p.name for p, _ in again] == ["scan-2_z001.png"]
    assert {p: p.read_bytes() for p in before} == before  # nothing replaced

    # The pairs are what the training package reads back.
    from training.data import find_pairs, load_pair

    found = find_pairs(tmp_path)
    assert len(found) == 4
    rgb, mask = load_pair(next(p for p in found if p.image.name == "scan_z001.png"))
    np.testing.assert_allclose(rgb, image[1] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(mask, labels[1] > 0)


def test_save_for_training_scales_float_gray_and_checks_shapes(tmp_path: Path) -> None:
    image = np.linspace(-1.0, 3.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    ((img_path, _),) = save_for_training(
        image, np.ones((64, 64), np.uint8), tmp_path, "g", rgb=False
    )
    saved = np.asarray(PILImage.open(img_path))
    assert saved.dtype == np.uint8 and saved.shape == (64, 64)
    assert saved.min() == 0 and saved.max() == 255
    with pytest.raises(ValueError, match="does not match"):
        save_for_training(image, np.ones((32, 64), np.uint8), tmp_path, "g", rgb=False)
    with pytest.raises(ValueError, match="outside the stack"):
        save_for_training(image[None], np.ones((1, 64, 64)), tmp_path, "g", rgb=False,
                          slices=[(4,)])  # fmt: skip
    assert len(list((tmp_path / "images").iterdir())) == 1
