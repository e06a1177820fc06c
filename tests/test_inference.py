"""The inference engine: every input form, both sizing policies, both backends, bad input.

The network is a real LV-UNet whose BatchNorm statistics are calibrated on synthetic
images (a random network's activations vanish through MobileNet's blocks and its output
is then almost constant; calibrated, it gives probabilities across (0, 1), so labels
compare meaningfully). ONNX Runtime is exported once for the module.
"""

from __future__ import annotations

import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from napari_lvunet import inference
from napari_lvunet.inference import (
    SegmentationCancelled,
    Segmenter,
    infer_axes,
    resolve_device,
    segment,
    state_dict_sha256,
)
from napari_lvunet.inference.postprocess import instances
from napari_lvunet.model import LVUNet
from napari_lvunet.preprocess import normalize


def disk_image(height: int, width: int, seed: int, n: int = 3) -> np.ndarray:
    """An RGB uint8 image: bright disks on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.empty((height, width, 3), np.uint8)
    img[...] = rng.integers(0, 90, 3)
    fg = rng.integers(150, 256, 3)
    for _ in range(n):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = rng.integers(max(2, min(height, width) // 10), max(3, min(height, width) // 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = fg
    return img


def calibrated_model(num_classes: int = 1) -> LVUNet:
    """A real LV-UNet at act_learn 1 whose BatchNorms saw synthetic images."""
    torch.manual_seed(1)
    model = LVUNet(num_classes)
    model.set_act_learn(1.0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    batch = np.stack([disk_image(256, 256, seed) for seed in range(4)])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    model.train()
    with torch.no_grad():
        model(normalize(x))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LVUNet:
    return calibrated_model()


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def ort_seg(model: LVUNet, onnx_cache: Path) -> Segmenter:
    """The default CPU path: ONNX Runtime on the fused model (one export per module)."""
    return Segmenter(model, device="cpu", cache_dir=onnx_cache)


@pytest.fixture(scope="module")
def torch_seg(model: LVUNet) -> Segmenter:
    return Segmenter(model, device="cpu", backend="torch")


def gray(height: int = 200, width: int = 230, seed: int = 0) -> np.ndarray:
    return disk_image(height, width, seed)[..., 0]


SIZINGS = ["resize", "tiles"]


# ----------------------------------------------------------------------------- devices


def test_resolve_device() -> None:
    from napari_lvunet.inference.device import gpu_may_exist

    # "auto" answers "cpu" without asking torch where no GPU driver exists (the
    # fresh-process tests check that torch is then not imported at all).
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not gpu_may_exist():
        expected = "cpu"
    assert resolve_device("auto") in (expected, "mps")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_gpu_warns_and_runs_on_cpu(model: LVUNet) -> None:
    with pytest.warns(RuntimeWarning, match="no CUDA GPU"):
        assert resolve_device("cuda:0") == "cpu"
    with pytest.warns(RuntimeWarning, match="no CUDA GPU"):
        seg = Segmenter(model, device="cuda", backend="torch")
    assert seg.device == "cpu"
    assert seg.segment(gray(64, 64)).shape == (64, 64)


# ----------------------------------------------------------------------------- backends


def test_default_cpu_backend_is_onnxruntime_cached_by_hash(
    ort_seg: Segmenter, model: LVUNet, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (ort_seg.device, ort_seg.backend) == ("cpu", "onnxruntime")
    assert ort_seg.onnx_path is not None and ort_seg.onnx_path.parent == onnx_cache
    assert state_dict_sha256(ort_seg._source.torch_model())[:32] in ort_seg.onnx_path.name
    # The engine's graph normalises itself: ONNX Runtime gets RGB in [0, 1].
    props = {p.key: p.value for p in onnx.load(ort_seg.onnx_path).metadata_props}
    assert props["input"] == "unit_rgb"
    # A second segmenter for the same weights reuses the file: no export.
    mtime = ort_seg.onnx_path.stat().st_mtime_ns

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again instead of using the cached file")

    monkeypatch.setattr("napari_lvunet.export.export_onnx", no_export)
    again = Segmenter(model, device="cpu", cache_dir=onnx_cache)
    assert again.onnx_path == ort_seg.onnx_path
    assert again.onnx_path.stat().st_mtime_ns == mtime


def test_num_threads(model: LVUNet, ort_seg: Segmenter, onnx_cache: Path) -> None:
    seg = Segmenter(model, device="cpu", cache_dir=onnx_cache, num_threads=1)
    assert seg._runner.session.get_session_options().intra_op_num_threads == 1
    image = disk_image(128, 128, seed=8)
    np.testing.assert_array_equal(seg.segment(image), ort_seg.segment(image))
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        Segmenter(model, device="cpu", num_threads=0)


def test_graphs_go_to_the_user_cache_never_beside_the_weights(
    ort_seg: Segmenter, tmp_path: Path
) -> None:
    """Loaded weights from a read-only folder: the graph lands in the cache folder."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    loaded = SimpleNamespace(
        model=ort_seg._source.torch_model(),
        metadata={"train_size": [128, 256]},
        sha256="0" * 64,
        path=weights_dir / "lvunet.safetensors",
    )
    weights_dir.chmod(0o555)
    try:
        seg = Segmenter(loaded, device="cpu", cache_dir=tmp_path / "cache")
    finally:
        weights_dir.chmod(0o755)
    assert seg.onnx_path is not None and seg.onnx_path.parent == tmp_path / "cache"
    assert list(weights_dir.iterdir()) == []
    assert seg.train_size == (128, 256)
    assert seg.segment(gray(100, 100)).shape == (100, 100)


@pytest.mark.parametrize("damage", ["flip", "garbage"])
def test_damaged_cached_graph_is_never_run(
    model: LVUNet, ort_seg: Segmenter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """A cached graph whose bytes differ from the sha256 in its name is deleted and made
    again, with a warning; a few flipped bytes in a weight would otherwise parse and run.

    The export itself is tested in test_export.py; here it copies the module's good graph.
    """
    assert ort_seg.onnx_path is not None
    good = ort_seg.onnx_path.read_bytes()
    cached = tmp_path / ort_seg.onnx_path.name
    if damage == "flip":
        middle = len(good) // 2
        cached.write_bytes(
            good[:middle] + bytes(b ^ 0xFF for b in good[middle : middle + 8]) + good[middle + 8 :]
        )
    else:
        cached.write_bytes(b"not an onnx file")
    calls: list[Path] = []

    def export_copy(fused: LVUNet, path: Path, **kwargs: object) -> Path:
        assert kwargs["include_normalization"] is True
        calls.append(path)
        path.write_bytes(good)
        return path

    monkeypatch.setattr("napari_lvunet.export.export_onnx", export_copy)
    with pytest.warns(RuntimeWarning, match="is damaged"):
        seg = Segmenter(model, device="cpu", cache_dir=tmp_path)
    assert len(calls) == 1 and seg.onnx_path == cached and seg.backend == "onnxruntime"
    assert cached.read_bytes() == good
    np.testing.assert_array_equal(seg.segment(gray(64, 64)), ort_seg.segment(gray(64, 64)))


@pytest.mark.parametrize("sizing", SIZINGS)
def test_onnxruntime_and_torch_give_the_same_labels(
    ort_seg: Segmenter, torch_seg: Segmenter, sizing: str
) -> None:
    image = disk_image(300, 420, seed=5)
    lab_o, p_o = ort_seg.segment(image, sizing=sizing, return_probabilities=True)
    lab_t, p_t = torch_seg.segment(image, sizing=sizing, return_probabilities=True)
    # float32 rounding of two runtimes on logits up to ~50: ~1e-5 in probability (the
    # TorchScript-exported graph measured 1.03e-5, the torch.export one 8e-6; 3.0e-5 in a
    # full-suite run on an AVX2 CPU without AVX-512, where thread scheduling changes the
    # order of float sums). 1e-4 keeps the check four orders below a flipped label; the
    # labels themselves are compared exactly below.
    np.testing.assert_allclose(p_o, p_t, atol=1e-4)
    decided = np.abs(p_t - 0.5) > 1e-4  # where 1e-8 float differences cannot flip a label
    np.testing.assert_array_equal(lab_o[decided], lab_t[decided])
    assert 0.05 < lab_t.mean() < 0.95, "the test model should give both labels"


def test_without_onnxruntime_cpu_runs_torch(model: LVUNet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.warns(RuntimeWarning, match="could not start the onnxruntime backend"):
        seg = Segmenter(model, device="cpu")
    assert seg.backend == "torch"
    with pytest.raises(ImportError, match="needs onnxruntime"):
        Segmenter(model, device="cpu", backend="onnxruntime")


def test_unfused_deep_training_model_runs_on_torch_untouched(torch_seg: Segmenter) -> None:
    model = calibrated_model()
    model.set_act_learn(0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg = Segmenter(model, device="cpu")
    assert seg.backend == "torch" and not seg._source.torch_model().fused
    labels = seg.segment(gray(64, 96))
    assert labels.shape == (64, 96)
    # The caller's model keeps its mode, form and values.
    assert model.training and not model.fused
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    with pytest.raises(ValueError, match="cannot be fused"):
        Segmenter(model, device="cpu", backend="onnxruntime")


def test_unfused_model_at_one_is_fused_on_a_copy(model: LVUNet, torch_seg: Segmenter) -> None:
    assert not model.fused
    assert torch_seg._source.torch_model().fused
    assert not model.fused


@pytest.mark.parametrize("supported", [True, False])
def test_bf16_support_on_cuda_is_torchs_answer(
    supported: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: the CUDA branch is checked against a stand-in for torch's own probe.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert inference.bf16_supported("cuda") is supported
    assert inference.bf16_supported("cuda:1") is supported


def test_bf16(model: LVUNet, torch_seg: Segmenter) -> None:
    image = disk_image(256, 256, seed=3)
    if inference.bf16_supported("cpu"):
        seg = Segmenter(model, device="cpu", bf16=True)
        assert seg.backend == "torch" and seg.bf16
        _, p16 = seg.segment(image, return_probabilities=True)
        _, p32 = torch_seg.segment(image, return_probabilities=True)
        assert np.abs(p16 - p32).mean() < 0.02
    else:
        with pytest.warns(RuntimeWarning, match="bf16 is not supported"):
            seg = Segmenter(model, device="cpu", bf16=True)
        assert not seg.bf16
    with pytest.raises(ValueError, match="bf16 runs on the torch backend"):
        Segmenter(model, device="cpu", backend="onnxruntime", bf16=True)


def test_bad_constructor_arguments(model: LVUNet) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        Segmenter(model, backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="or an LVUNet"):
        Segmenter(torch.nn.Conv2d(3, 1, 1))  # type: ignore[arg-type]
    bad_size = SimpleNamespace(
        model=model, metadata={"train_size": [200, 200]}, sha256="", path=None
    )
    with pytest.raises(ValueError, match="not a multiple of 128"):
        Segmenter(bad_size, backend="torch")


def test_gpu_out_of_memory_falls_back_to_cpu(model: LVUNet) -> None:
    """A GPU's out-of-memory error moves the segmenter to the CPU and the batch is rerun.

    No GPU here: the runner runs on torch's "meta" device (tensors without data) and the
    network raises torch's OutOfMemoryError, as CUDA does.
    """
    from napari_lvunet.inference.backends.torch import TorchRunner

    seg = Segmenter(model, device="cpu", backend="torch")
    expected = seg.segment(gray(64, 64))

    class OutOfMemory(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    oom_runner = TorchRunner(OutOfMemory(), "cpu", False)
    oom_runner.device = "meta"
    seg._runner, seg.device = oom_runner, "meta"
    with pytest.warns(RuntimeWarning, match=r"GPU \(meta\) ran out of memory"):
        labels = seg.segment(gray(64, 64))
    np.testing.assert_array_equal(labels, expected)
    assert (seg.device, seg.backend) == ("cpu", "torch")
    assert seg._runner is not oom_runner


# ----------------------------------------------------------------------------- input forms


@pytest.mark.parametrize("sizing", SIZINGS)
def test_2d_grayscale_dtypes(ort_seg: Segmenter, sizing: str) -> None:
    g = gray(150, 170)
    ref = ort_seg.segment(g, sizing=sizing)
    assert ref.shape == g.shape and ref.dtype == np.uint8 and set(np.unique(ref)) <= {0, 1}
    assert 0 < ref.mean() < 1
    # Non-uint8 dtypes are min-max scaled per image: an affine copy gives the same labels.
    lo, hi = int(g.min()), int(g.max())
    unit = (g.astype(np.float64) - lo) / (hi - lo)
    variants = {
        "float32 any range": (unit * 1000 - 300).astype(np.float32),
        "float64": unit,
        "float16": unit.astype(np.float16),
        "uint16": np.round(unit * 65535).astype(np.uint16),
        "int16 negative": np.round(unit * 30000 - 15000).astype(np.int16),
        "int64": np.round(unit * 1e6).astype(np.int64),
    }
    expected = ort_seg.segment(np.round(unit * 255).astype(np.uint8), sizing=sizing)
    for name, image in variants.items():
        labels = ort_seg.segment(image, sizing=sizing)
        assert labels.shape == g.shape, name
        assert (labels != expected).mean() < 0.002, name


@pytest.mark.parametrize("sizing", SIZINGS)
def test_rgb_rgba_channel_first_and_singleton_channel(ort_seg: Segmenter, sizing: str) -> None:
    rgb = disk_image(140, 190, seed=1)
    ref, p_ref = ort_seg.segment(rgb, sizing=sizing, return_probabilities=True)
    assert ref.shape == (140, 190) and p_ref.shape == (140, 190) and p_ref.dtype == np.float32
    np.testing.assert_array_equal(ref, p_ref > 0.5)
    rgba = np.concatenate([rgb, np.full((140, 190, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(ort_seg.segment(rgba, sizing=sizing), ref)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(ort_seg.segment(chw, axes="CYX", sizing=sizing), ref)
    # Grayscale with a trailing singleton channel is the same image as 2D grayscale.
    g = rgb[..., 1]
    np.testing.assert_array_equal(
        ort_seg.segment(g[..., None], sizing=sizing), ort_seg.segment(g, sizing=sizing)
    )


@pytest.mark.parametrize("sizing", SIZINGS)
def test_stacks_are_segmented_slice_by_slice(ort_seg: Segmenter, sizing: str) -> None:
    frames = [disk_image(96, 136, seed=s) for s in range(5)]
    singles = np.stack([ort_seg.segment(f, sizing=sizing) for f in frames])
    rgb_stack = np.stack(frames)  # (Z, Y, X, C)
    # batch_size 2 makes batches span frames and end mid-stack.
    np.testing.assert_array_equal(ort_seg.segment(rgb_stack, sizing=sizing, batch_size=2), singles)
    gray_stack = rgb_stack[..., 0]
    gray_singles = np.stack([ort_seg.segment(f, sizing=sizing) for f in gray_stack])
    zyx = ort_seg.segment(gray_stack, sizing=sizing, batch_size=3)
    np.testing.assert_array_equal(zyx, gray_singles)
    # Any axis order: the output keeps the image's order.
    yxz = ort_seg.segment(np.moveaxis(gray_stack, 0, -1), axes="YXZ", sizing=sizing)
    np.testing.assert_array_equal(yxz, np.moveaxis(gray_singles, 0, -1))


@pytest.mark.parametrize("sizing", SIZINGS)
def test_4d_and_5d(ort_seg: Segmenter, sizing: str) -> None:
    frames = np.stack([disk_image(64, 80, seed=s) for s in range(6)])
    tzyxc = frames.reshape(2, 3, 64, 80, 3)
    out = ort_seg.segment(tzyxc, sizing=sizing)
    assert out.shape == (2, 3, 64, 80)
    np.testing.assert_array_equal(out[1, 2], ort_seg.segment(frames[5], sizing=sizing))
    tzyx = tzyxc[..., 2]
    out4 = ort_seg.segment(tzyx, sizing=sizing, return_probabilities=True)
    assert out4[0].shape == (2, 3, 64, 80) and out4[1].shape == (2, 3, 64, 80)
    np.testing.assert_array_equal(out4[0][0, 1], ort_seg.segment(tzyx[0, 1], sizing=sizing))
    # Channel-first stacks via axes, e.g. napari's (Z, C, Y, X) before channel splitting.
    zcyx = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(
        ort_seg.segment(zcyx, axes="ZCYX", sizing=sizing), ort_seg.segment(frames, sizing=sizing)
    )


def test_ambiguous_small_first_axis_is_a_stack() -> None:
    assert infer_axes((3, 64, 64)) == "ZYX"
    assert infer_axes((64, 64, 3)) == "YXC"
    assert infer_axes((64, 64, 4)) == "YXC"
    assert infer_axes((64, 64, 1)) == "YXC"
    assert infer_axes((5, 64, 64, 3)) == "ZYXC"
    assert infer_axes((2, 5, 64, 64)) == "TZYX"
    assert infer_axes((2, 5, 64, 64, 3)) == "TZYXC"


def test_dask_array_is_read_frame_by_frame(ort_seg: Segmenter) -> None:
    da = pytest.importorskip("dask.array")
    stack = np.stack([disk_image(64, 64, seed=s) for s in range(4)])
    lazy = da.from_array(stack, chunks=(1, 64, 64, 3))
    np.testing.assert_array_equal(ort_seg.segment(lazy), ort_seg.segment(stack))


def test_resize_and_tiles_agree_at_the_training_size(ort_seg: Segmenter) -> None:
    """At 256 x 256 neither policy resizes or pads: the same network input."""
    image = disk_image(256, 256, seed=9)
    _, p_resize = ort_seg.segment(image, sizing="resize", return_probabilities=True)
    _, p_tiles = ort_seg.segment(image, sizing="tiles", return_probabilities=True)
    np.testing.assert_allclose(p_resize, p_tiles, atol=1e-6)


def test_small_and_odd_sizes(ort_seg: Segmenter) -> None:
    for shape in [(1, 1), (5, 300), (37, 61), (129, 257)]:
        image = gray(*shape)
        for sizing in SIZINGS:
            assert ort_seg.segment(image, sizing=sizing).shape == shape


def test_multiclass_softmax_and_argmax() -> None:
    seg = Segmenter(calibrated_model(num_classes=3), device="cpu", backend="torch")
    image = disk_image(100, 120, seed=2)
    for sizing in SIZINGS:
        labels, probs = seg.segment(image, sizing=sizing, return_probabilities=True)
        assert labels.shape == (100, 120) and labels.dtype == np.uint8
        assert probs.shape == (3, 100, 120) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(labels, probs.argmax(axis=0))
        # threshold does not apply to argmax
        np.testing.assert_array_equal(seg.segment(image, sizing=sizing, threshold=0.9), labels)
    stack_probs = seg.segment(np.stack([image] * 2), return_probabilities=True)[1]
    assert stack_probs.shape == (3, 2, 100, 120)


def test_threshold(ort_seg: Segmenter) -> None:
    image = disk_image(128, 128, seed=4)
    labels, probs = ort_seg.segment(image, threshold=0.3, return_probabilities=True)
    np.testing.assert_array_equal(labels, probs > 0.3)
    assert ort_seg.segment(image, threshold=1.0).sum() == 0


# ----------------------------------------------------------------------------- instances


def test_instances_are_connected_components(ort_seg: Segmenter) -> None:
    from skimage.measure import label

    image = disk_image(200, 200, seed=7, n=5)
    semantic = ort_seg.segment(image)
    instances = ort_seg.segment(image, output="instances")
    expected = label(semantic)
    assert instances.dtype == np.uint8
    np.testing.assert_array_equal(instances, expected)
    np.testing.assert_array_equal(instances > 0, semantic > 0)


def test_instance_numbering_and_dtype() -> None:
    # 400 separate pixels in one frame need uint16.
    semantic = np.zeros((2, 40, 40), np.uint8)
    semantic[0, ::2, ::2] = 1
    semantic[1, 5:10, 5:10] = 1
    per_time = instances(semantic, has_time=True)
    assert per_time.dtype == np.uint16
    assert per_time[0].max() == 400 and per_time[1].max() == 1  # numbered per time point
    volume = instances(semantic, has_time=False)
    # Z stack: 3D components; slice 1's block touches 16 of slice 0's pixels and joins them.
    assert volume.max() == 400 - 16 + 1


# ----------------------------------------------------------------------------- progress / cancel


def test_progress_and_cancel(ort_seg: Segmenter) -> None:
    stack = np.stack([gray(64, 64, seed=s) for s in range(5)])
    calls: list[tuple[int, int]] = []
    ort_seg.segment(stack, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    tiles: list[tuple[int, int]] = []
    ort_seg.segment(
        gray(300, 300),
        sizing="tiles",
        tile_size=128,
        overlap=0.25,
        batch_size=4,
        progress=lambda d, t: tiles.append((d, t)),
    )
    assert tiles[-1] == (9, 9)

    event = threading.Event()
    event.set()
    with pytest.raises(SegmentationCancelled):
        ort_seg.segment(stack, cancel=event)
    later = threading.Event()
    seen: list[int] = []

    def cancel_after_first(done: int, total: int) -> None:
        seen.append(done)
        later.set()

    with pytest.raises(SegmentationCancelled):
        ort_seg.segment(stack, batch_size=2, progress=cancel_after_first, cancel=later)
    assert seen == [2]


# ----------------------------------------------------------------------------- tiling


def test_tiling_bookkeeping_is_exact_for_a_pointwise_network(model: LVUNet) -> None:
    """With a per-pixel network every tile layout must reproduce one big pass exactly.

    This isolates the tiling (positions, padding, cropping, blending, stacks) from the
    real network's context dependence, which the trained-weights test below covers.
    """
    seg = Segmenter(model, device="cpu", backend="torch")
    seg._runner = lambda batch: batch.mean(axis=1, keepdims=True) * 3.0
    stack = np.stack([gray(333, 517, seed=s) for s in range(2)])
    _, whole = seg.segment(stack, sizing="tiles", tile_size=640, return_probabilities=True)
    for tile, overlap in [(128, 0.0), (128, 0.5), (256, 0.25), (384, 0.1)]:
        _, tiled = seg.segment(
            stack,
            sizing="tiles",
            tile_size=tile,
            overlap=overlap,
            batch_size=3,
            return_probabilities=True,
        )
        np.testing.assert_allclose(tiled, whole, atol=1e-6, err_msg=f"{tile=} {overlap=}")


def test_tiled_matches_untiled_with_trained_weights() -> None:
    """Where both fit, sliding-window tiles agree with one pass at native resolution."""
    weights = pytest.importorskip("napari_lvunet.weights")
    if weights.DEFAULT_MODEL not in weights.registry() or not weights.is_available_offline(
        weights.DEFAULT_MODEL
    ):
        pytest.skip("the trained default weights are not bundled yet")
    from napari_lvunet._sample_data import polyp

    image = polyp()[0][0]
    seg = Segmenter(weights.load_model(weights.DEFAULT_MODEL), device="cpu", backend="torch")
    size = -(-max(image.shape[:2]) // 128) * 128
    lab_1, p_1 = seg.segment(image, sizing="tiles", tile_size=size, return_probabilities=True)
    # Tiles of the engine's default size: the blending itself is exact (see the per-pixel
    # stand-in above); what remains is context, since a tile sees less of the polyp than
    # the whole frame (measured on the sample with the bundled 250-epoch weights: mean
    # probability difference 0.041, 3.8 % of labels; with 256-pixel tiles 0.075 and 8 %).
    lab_t, p_t = seg.segment(
        image, sizing="tiles", tile_size=512, overlap=0.5, return_probabilities=True
    )
    assert np.abs(p_1 - p_t).mean() < 0.06
    assert (lab_1 != lab_t).mean() < 0.06


def test_tiles_bad_options(ort_seg: Segmenter) -> None:
    with pytest.raises(ValueError, match="tile_size must be a positive multiple of 128"):
        ort_seg.segment(gray(64, 64), sizing="tiles", tile_size=200)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        ort_seg.segment(gray(64, 64), sizing="tiles", overlap=1.0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("image", "axes", "message"),
    [
        (np.array([]), None, "image is empty"),
        (np.zeros((0, 64)), None, "zero-size axis"),
        (np.zeros((64, 0, 3), np.uint8), None, "zero-size axis"),
        (np.zeros(64), None, "at least 2 dimensions"),
        (np.float32(3.0), None, "at least 2 dimensions"),
        (np.zeros((64, 64), complex), None, "unsupported image dtype complex128"),
        (np.zeros((64, 64), object), None, "unsupported image dtype object"),
        (np.zeros((64, 64), bool), None, "unsupported image dtype bool"),
        (np.full((64, 64), "a"), None, "unsupported image dtype"),
        (np.zeros((2, 2, 2, 8, 8)), None, "more than 4 spatial/stack dimensions"),
        (np.zeros((2, 2, 2, 2, 8, 8, 3)), None, "more than 4 spatial/stack dimensions"),
        (np.zeros((8, 8)), "YXC", "has 3 letters"),
        (np.zeros((8, 8)), "YQ", "unknown letters"),
        (np.zeros((8, 8, 8)), "YXY", "repeats a letter"),
        (np.zeros((8, 8, 8)), "ZTY", "must contain Y and X"),
        (np.zeros((8, 8, 2)), "YXC", "2 channels"),
        (np.zeros((5, 8, 8)), "CYX", "5 channels"),
    ],
)
def test_bad_images(
    torch_seg: Segmenter, image: np.ndarray, axes: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        torch_seg.segment(image, axes=axes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(torch_seg: Segmenter, bad: float) -> None:
    image = gray(64, 64).astype(np.float32)
    image[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        torch_seg.segment(image)
    stack = np.stack([gray(64, 64).astype(np.float32)] * 3)
    stack[2, 0, 0] = bad
    with pytest.raises(ValueError, match=r"frame Z=2: .*NaN or infinite"):
        torch_seg.segment(stack)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizing": "crop"}, "sizing must be"),
        ({"output": "panoptic"}, "output must be"),
        ({"threshold": 1.5}, "threshold must be in"),
        ({"batch_size": 0}, "batch_size must be"),
    ],
)
def test_bad_options(torch_seg: Segmenter, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        torch_seg.segment(gray(64, 64), **kwargs)


def test_segment_function(model: LVUNet, torch_seg: Segmenter) -> None:
    image = disk_image(128, 160, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = segment(image, model, device="cpu", backend="torch", sizing="tiles")
    np.testing.assert_array_equal(labels, torch_seg.segment(image, sizing="tiles"))
