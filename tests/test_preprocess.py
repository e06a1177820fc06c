"""The one preprocessing that training and inference share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lvunet.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAIN_SIZE,
    normalize,
    resize,
    to_unit_rgb,
    unit_range,
)

H, W = 12, 17


def check_unit_rgb(out: np.ndarray) -> None:
    assert out.shape == (H, W, 3)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def ramp(dtype: np.dtype, lo: float, hi: float, channels: int | None = None) -> np.ndarray:
    shape = (H, W) if channels is None else (H, W, channels)
    return np.linspace(lo, hi, num=int(np.prod(shape))).reshape(shape).astype(dtype)


# --------------------------------------------------------------------------- to_unit_rgb


def test_uint8_is_divided_by_255_not_stretched() -> None:
    # A dark uint8 photo must stay dark: the training JPEGs were scaled by 1/255 too.
    image = np.full((H, W, 3), 51, dtype=np.uint8)
    image[0, 0] = (0, 102, 204)
    out = to_unit_rgb(image)
    check_unit_rgb(out)
    np.testing.assert_allclose(out[1, 1], [0.2, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.4, 0.8], rtol=1e-6)


def test_rgb_channel_order_is_kept() -> None:
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red stays in channel 0 (no BGR swap)
    out = to_unit_rgb(image)
    assert (out[..., 0] == 1).all() and (out[..., 1:] == 0).all()


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [
        (np.uint16, 100, 4000),
        (np.int16, -1000, 3000),
        (np.int32, -5, 70000),
        (np.int64, 0, 10),
        (np.float16, 0.25, 0.75),
        (np.float32, -3.5, 12.0),
        (np.float64, 1e3, 1e6),
    ],
)
def test_non_uint8_is_min_max_scaled_per_image(dtype: np.dtype, lo: float, hi: float) -> None:
    image = ramp(dtype, lo, hi)
    out = to_unit_rgb(image)
    check_unit_rgb(out)
    assert out.min() == 0.0
    assert out.max() == pytest.approx(1.0)
    expected = (image.astype(np.float64) - image.min()) / (float(image.max()) - float(image.min()))
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)


def test_grayscale_is_replicated_to_three_channels() -> None:
    image = ramp(np.uint8, 0, 255)
    for variant in (image, image[..., None]):
        out = to_unit_rgb(variant)
        check_unit_rgb(out)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
        np.testing.assert_allclose(out[..., 0], image / 255.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_rgba_alpha_is_dropped(dtype: np.dtype) -> None:
    rgb = ramp(dtype, 0, 200, channels=3)
    rgba = np.concatenate([rgb, np.zeros((H, W, 1), dtype=dtype)], axis=-1)
    out = to_unit_rgb(rgba)
    check_unit_rgb(out)
    # The alpha channel (all 0) must not take part in the scaling either.
    np.testing.assert_array_equal(out, to_unit_rgb(rgb))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_constant_image_becomes_zeros(dtype: np.dtype) -> None:
    out = to_unit_rgb(np.full((H, W), 7, dtype=dtype))
    check_unit_rgb(out)
    assert not out.any()


def test_input_is_not_modified() -> None:
    image = ramp(np.float32, -2, 2, channels=4)
    before = image.copy()
    to_unit_rgb(image)
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((H, W), dtype=bool),
        np.zeros((H, W), dtype=np.complex64),
        np.zeros((H, W), dtype=object),
        np.full((H, W), "a"),
    ],
    ids=["bool", "complex", "object", "str"],
)
def test_unsupported_dtype_raises(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="dtype"):
        to_unit_rgb(image)


@pytest.mark.parametrize(
    "shape", [(W,), (H, W, 2), (H, W, 5), (2, H, W, 3)], ids=["1d", "2ch", "5ch", "4d"]
)
def test_unsupported_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        to_unit_rgb(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise(bad: float) -> None:
    image = ramp(np.float32, 0, 1)
    image[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_unit_rgb(image)


# --------------------------------------------------------------------------- normalize


def test_normalize_applies_imagenet_mean_and_std() -> None:
    batch = torch.rand(2, 3, 8, 9)
    out = normalize(batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (batch - mean) / std)


def test_normalize_maps_the_imagenet_mean_to_zero() -> None:
    batch = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    out = normalize(batch)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.zeros_like(out))


def test_normalize_does_not_modify_its_input() -> None:
    batch = torch.rand(1, 3, 4, 4)
    before = batch.clone()
    normalize(batch)
    torch.testing.assert_close(batch, before, atol=0, rtol=0)


def test_pipeline_from_uint8_to_network_input() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    batch = torch.from_numpy(to_unit_rgb(image)).permute(2, 0, 1)[None]
    out = normalize(batch)
    assert out.shape == (1, 3, H, W) and out.dtype == torch.float32
    expected = (image[1, 2, 0] / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert float(out[0, 0, 1, 2]) == pytest.approx(expected, rel=1e-5)


def test_training_size_is_the_papers() -> None:
    assert TRAIN_SIZE == (256, 256)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (3, 8, 8), (2, 4, 8, 8)])
def test_normalize_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        normalize(torch.zeros(shape))


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ((480, 640), (256, 256)),
        ((1080, 1920), (256, 256)),
        ((100, 90), (256, 256)),
        ((256, 256), (1080, 1920)),
        ((37, 300), (256, 128)),
        ((256, 256), (100, 90)),
    ],
)
@pytest.mark.parametrize("antialias", [True, False])
def test_numpy_resize_is_torchs(source, target, antialias: bool) -> None:
    """CPU inference resizes with numpy, training with torch: the same numbers, so the
    model sees at inference what it saw in training (float32 rounding apart)."""
    images = np.random.default_rng(0).random((2, 3, *source), dtype=np.float32)
    ours = resize(images, target, antialias=antialias, clamp=False)
    theirs = resize(torch.from_numpy(images), target, antialias=antialias, clamp=False).numpy()
    assert ours.shape == theirs.shape == (2, 3, *target)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-5)


def test_normalize_numpy_equals_torch() -> None:
    batch = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(
        normalize(batch), normalize(torch.from_numpy(batch)).numpy(), rtol=1e-6, atol=1e-6
    )


def test_pieces_scaled_with_the_whole_images_range_equal_the_whole() -> None:
    """Large non-uint8 frames are converted in tiles or row blocks with one range."""
    image = np.random.default_rng(2).integers(100, 4000, (64, 48), dtype=np.uint16)
    whole = to_unit_rgb(image)
    value_range = unit_range(image)
    top = to_unit_rgb(image[:20], value_range)
    np.testing.assert_array_equal(top, whole[:20])
    assert unit_range(np.zeros((2, 2), np.uint8)) is None
