"""Videos: lazy reading, writing, drawing, per-frame statistics, the napari reader.

Real files throughout: videos are encoded with PyAV (H.264 via the FFmpeg in its wheel)
into temporary folders, read back and compared with the frames that went in; the shipped
sample video is read as napari reads it. Segmentation runs the bundled model through the
engine (ONNX Runtime on the CPU, no torch) on the sample video and compares with
segmenting the same frames as plain images.
"""

from __future__ import annotations

import csv
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_lvunet import video as vid
from napari_lvunet._reader import get_reader, read_video
from napari_lvunet.io import staged_files

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = ROOT / "sample_data" / "kvasir_video.mp4"
SAMPLE_MASKS = ROOT / "sample_data" / "kvasir_video_masks.tif"


def moving_frames(n: int, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """Frames with a bright square that moves: every frame differs from its neighbours."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[...] = rng.integers(20, 80, 3, dtype=np.uint8)
    for i in range(n):
        y, x = (3 * i) % (height - 24), (5 * i) % (width - 24)
        frames[i, y : y + 24, x : x + 24] = (230, 200 - i % 50, 40 + i % 100)
    return frames


def write_video(path: Path, frames: np.ndarray, fps: float | Fraction = 25, **kw) -> Path:
    with vid.VideoWriter(path, fps=fps, **kw) as writer:
        for frame in frames:
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def lossless_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """60 frames written losslessly, with a key frame every 12 (so reads must seek)."""
    frames = moving_frames(60)
    path = tmp_path_factory.mktemp("video") / "moving.mp4"
    # Lossless for exact comparisons (the square's colours are arbitrary RGB: 4:2:0
    # chroma makes them approximate, so compare with what the decoder returns in order).
    return write_video(path, frames, lossless=True), frames


# --------------------------------------------------------------------------- reading


def test_sample_video_opens_lazily_with_its_rate() -> None:
    video = vid.open_video(SAMPLE_VIDEO)
    assert video.shape == (100, 360, 448, 3) and video.dtype == np.uint8 and video.ndim == 4
    assert len(video) == 100 and video.fps == 25 and video.rate == 25
    np.testing.assert_allclose(video.frame_times[:3], [0.0, 0.04, 0.08], rtol=1e-9)
    assert video.decoded_frames == 0, "opening reads the packet index only"
    frame = video[50]
    assert frame.shape == (360, 448, 3) and video.decoded_frames == 1
    assert SAMPLE_VIDEO.stat().st_size < 3_000_000, "the sample stays small"


def test_random_access_equals_decoding_in_order(lossless_video) -> None:
    path, _ = lossless_video
    video = vid.open_video(path, cache_bytes=3 * 96 * 128 * 3)  # a 3-frame cache
    in_order = np.stack(list(video.iter_frames()))
    assert in_order.shape == video.shape
    rng = np.random.default_rng(1)
    order = [59, 0, 30, 29, 31, 5, 58, 12, 11, *rng.integers(0, 60, 25).tolist()]
    for i in order:
        np.testing.assert_array_equal(video[i], in_order[i], err_msg=f"frame {i}")
    # Frames are decoded from the key frame before them, never the whole video each time.
    assert video.decoded_frames <= len(order)


def test_random_access_with_b_frames() -> None:
    # The sample was encoded with x264's "slow" preset: B-frames, so decode order differs
    # from presentation order, and only a few key frames.
    video = vid.open_video(SAMPLE_VIDEO, cache_bytes=0)
    in_order = np.stack(list(video.iter_frames()))
    for i in [99, 3, 50, 49, 2, 98, 0, 77]:
        np.testing.assert_array_equal(video[i], in_order[i], err_msg=f"frame {i}")
    np.testing.assert_array_equal(np.stack(list(video.iter_frames(40, 45))), in_order[40:45])


def test_rgb_video_round_trip_is_close(lossless_video) -> None:
    path, frames = lossless_video
    video = vid.open_video(path)
    back = np.stack(list(video.iter_frames()))
    # Lossless H.264 keeps the YUV 4:2:0 planes; RGB -> YUV -> RGB rounds by a few levels
    # (and chroma is shared by 2 x 2 pixels at the square's edges).
    error = np.abs(back.astype(int) - frames.astype(int))
    assert np.median(error) <= 2 and error.mean() < 3


def test_numpy_indexing(lossless_video) -> None:
    path, _ = lossless_video
    video = vid.open_video(path)
    full = np.stack(list(video.iter_frames()))
    keys = [
        np.s_[3],
        np.s_[-1],
        np.s_[10:20, 5:50, ::3],
        np.s_[[3, 1, 3], 2],
        np.s_[..., 1],
        np.s_[2:9:3, ..., 0],
        np.s_[0:10, [0, 1], :, [0, 1]],
        np.s_[5:5],
        np.s_[np.arange(60) % 7 == 0],
        np.s_[np.int64(4), 10],
    ]
    for key in keys:
        got = video[key]
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, full[key], err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(video), full)
    with pytest.raises(IndexError):
        video[60]
    with pytest.raises(IndexError):
        video[None]


def test_memory_is_bounded_by_the_cache(lossless_video) -> None:
    path, _ = lossless_video
    video = vid.open_video(path, cache_bytes=4 * 96 * 128 * 3)
    for i in range(60):
        video[i]
    assert len(video._cache) == 4
    assert all(not frame.flags.writeable for frame in video._cache.values())
    out = video[7]
    out[...] = 0  # a copy: the cached frame is untouched
    assert video[7].any()


def test_concurrent_readers_see_the_right_frames(lossless_video) -> None:
    path, _ = lossless_video
    video = vid.open_video(path, cache_bytes=2 * 96 * 128 * 3)
    full = np.stack(list(video.iter_frames()))
    failures: list[int] = []

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in rng.integers(0, 60, 30):
            if not np.array_equal(video[int(i)], full[i]):
                failures.append(int(i))

    threads = [threading.Thread(target=read, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@pytest.mark.parametrize("suffix", [".mkv", ".mov", ".avi"])
def test_other_containers(suffix: str, tmp_path: Path) -> None:
    frames = moving_frames(12, 64, 80)
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=Fraction(30000, 1001), lossless=True)
    video = vid.open_video(path)
    assert video.shape == (12, 64, 80, 3)
    assert abs(video.fps - 29.97) < 0.01
    np.testing.assert_array_equal(video[11], np.stack(list(video.iter_frames()))[11])


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "cannot open"), (b"\x00\x00\x00\x18ftypmp42 not a movie", "cannot open")],
)
def test_bad_files_raise_video_error(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(vid.VideoError, match=message):
        vid.open_video(path)
    with pytest.raises(vid.VideoError, match="no such file"):
        vid.open_video(tmp_path / "missing.mp4")


def test_truncated_video_reports_where_it_ends(tmp_path: Path) -> None:
    cut = tmp_path / "cut.mkv"
    # A stream cut in half: Matroska keeps its index up front, so the file still opens.
    write_video(cut, moving_frames(40), lossless=True)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    video = vid.open_video(cut)
    assert 0 < len(video) < 40  # the packet index counts what is really there
    frames = list(video.iter_frames())
    assert len(frames) == len(video)


# --------------------------------------------------------------------------- writing


def test_mask_video_keeps_0_and_255_exactly(tmp_path: Path) -> None:
    masks = np.zeros((20, 90, 118), np.uint8)  # odd-free sizes; see the odd test below
    for i in range(20):
        masks[i, 10 + i : 50 + i, 20 : 40 + 3 * i] = 255
    path = write_video(tmp_path / "mask.mp4", masks, fps=12.5, lossless=True)
    video = vid.open_video(path)
    assert video.shape == (20, 90, 118, 3) and video.fps == 12.5
    back = np.stack(list(video.iter_frames()))
    np.testing.assert_array_equal(back, np.repeat(masks[..., None], 3, axis=-1))


def test_odd_sizes_are_padded_by_one_edge_pixel(tmp_path: Path) -> None:
    frames = moving_frames(5, 63, 81)
    video = vid.open_video(write_video(tmp_path / "odd.mp4", frames, lossless=True))
    assert video.shape == (5, 64, 82, 3)


def test_writer_refuses_mixed_sizes_and_bad_frames(tmp_path: Path) -> None:
    with vid.VideoWriter(tmp_path / "x.mp4", fps=25) as writer:
        writer.write(moving_frames(1, 32, 32)[0])
        with pytest.raises(ValueError, match="in a video of"):
            writer.write(moving_frames(1, 64, 32)[0])
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="fps"):
        vid.VideoWriter(tmp_path / "y.mp4", fps=0)


def test_staged_files_land_together_or_not_at_all(tmp_path: Path) -> None:
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(RuntimeError), staged_files(targets, overwrite=False) as temps:
        temps[0].write_text("a")
        raise RuntimeError("the second file failed")
    assert list(tmp_path.iterdir()) == []
    targets[1].write_text("someone else's")
    with pytest.raises(FileExistsError), staged_files(targets, overwrite=False) as temps:
        for temp in temps:
            temp.write_text("new")
    assert not targets[0].exists() and targets[1].read_text() == "someone else's"
    with staged_files(targets, overwrite=True) as temps:
        for temp, text in zip(temps, "xy", strict=True):
            temp.write_text(text)
    assert [t.read_text() for t in targets] == ["x", "y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


# --------------------------------------------------------------------------- drawing


def test_overlay_tints_labels_and_outlines_them() -> None:
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(3)
    image = rng.integers(0, 200, (60, 70, 3), dtype=np.uint8)
    labels = np.zeros((60, 70), np.uint8)
    labels[10:30, 5:25] = 1
    labels[40:60, 50:70] = 2  # touches the frame's corner
    out = vid.overlay(image, labels)
    assert out.shape == (60, 70, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[labels == 0], image[labels == 0])
    outline = (out == (255, 255, 0)).all(axis=-1)
    expected = find_boundaries(labels, mode="inner")
    expected[[0, -1], :] |= labels[[0, -1], :] > 0
    expected[:, [0, -1]] |= labels[:, [0, -1]] > 0
    np.testing.assert_array_equal(outline, expected & (labels > 0))
    inside = (labels > 0) & ~outline
    # Tinted: 35 % of the label's colour (red for label 1) over the image.
    one = inside & (labels == 1)
    tint = 0.65 * image[one] + 0.35 * np.array([255, 0, 0])
    np.testing.assert_allclose(out[one], tint, atol=1.01)
    first, second = out[15, 15].astype(int), out[50, 60].astype(int)
    assert not np.array_equal(first - image[15, 15], second - image[50, 60]), "two colours"
    np.testing.assert_array_equal(vid.overlay(image, np.zeros_like(labels)), image)


def test_frame_stats() -> None:
    labels = np.zeros((40, 50), np.uint8)
    labels[5:10, 6:12] = 1
    labels[30:32, 40:45] = 1
    labels[10, 12] = 1  # touches the first region diagonally: still one region
    probs = np.full((40, 50), 0.1, np.float32)
    probs[labels > 0] = 0.8
    probs[5, 6] = 0.6
    stats = vid.frame_stats(labels, probs)
    area = 30 + 10 + 1
    assert stats["area_px"] == area
    assert stats["area_fraction"] == pytest.approx(area / 2000)
    assert (stats["bbox_y0"], stats["bbox_x0"], stats["bbox_y1"], stats["bbox_x1"]) == (
        5,
        6,
        32,
        45,
    )
    assert stats["n_regions"] == 2
    assert stats["mean_probability"] == pytest.approx((0.8 * (area - 1) + 0.6) / area, rel=1e-6)
    empty = vid.frame_stats(np.zeros((4, 4), np.uint8), probs[:4, :4])
    assert empty["area_px"] == 0 and empty["bbox_y0"] == "" and empty["mean_probability"] == ""
    classes = np.stack([1 - probs, probs])  # (C, H, W) from a two-class model
    assert vid.frame_stats(labels, classes)["mean_probability"] == pytest.approx(
        stats["mean_probability"], rel=1e-6
    )


# --------------------------------------------------------------------------- napari


def test_reader_hook_accepts_videos_only(tmp_path: Path) -> None:
    assert get_reader(str(SAMPLE_VIDEO)) is read_video
    assert get_reader(str(tmp_path / "CLIP.MKV")) is read_video
    assert get_reader(str(tmp_path / "image.png")) is None
    assert get_reader([str(SAMPLE_VIDEO), str(tmp_path / "image.png")]) is None
    ((data, kwargs, kind),) = read_video(str(SAMPLE_VIDEO))
    assert kind == "image" and kwargs["rgb"] is True and kwargs["name"] == "kvasir_video"
    assert kwargs["metadata"]["fps"] == 25 and len(kwargs["metadata"]["frame_times"]) == 100
    assert isinstance(data, vid.Video)


def test_sample_masks_match_the_video() -> None:
    masks = tifffile.imread(SAMPLE_MASKS)
    assert masks.shape == (100, 360, 448) and set(np.unique(masks)) == {0, 1}
    # The polyp is in every frame (the chosen frames show one each) and moves.
    areas = masks.reshape(100, -1).sum(axis=1)
    assert (areas > 0).all() and len(set(areas.tolist())) > 50


@pytest.mark.gui
def test_napari_opens_a_video_lazily_and_scrubs(qtbot) -> None:
    import napari

    viewer = napari.Viewer(show=False)
    try:
        (layer,) = viewer.open(str(SAMPLE_VIDEO), plugin="napari-lvunet")
        video = layer.data
        assert isinstance(video, vid.Video) and layer.rgb and layer.ndim == 3
        assert layer.metadata["fps"] == 25
        viewer.dims.set_point(0, 60)
        np.testing.assert_array_equal(np.asarray(layer._slice.image.view), video[60])
        assert video.decoded_frames < 10, "napari decodes the frames it shows, not the video"
        layers = viewer.open_sample("napari-lvunet", "polyp_video")
        assert [type(layer.data).__name__ for layer in layers] == ["Video", "ndarray"]
    finally:
        viewer.close()


# --------------------------------------------------------------------------- segmenting


@pytest.fixture(scope="module")
def segmenter():
    from napari_lvunet.inference import default_pool

    return default_pool().get("lvunet-kvasir-seg", device="cpu")


@pytest.mark.slow
def test_segment_video_equals_segmenting_frames_as_images(segmenter, tmp_path: Path) -> None:
    video = vid.open_video(SAMPLE_VIDEO)
    out = tmp_path / "out"
    out.mkdir()
    paths = {k: out / f"v_{k}" for k in ("mask.mp4", "overlay.mp4", "frames.csv")}
    done: list[int] = []
    summary = vid.segment_video(
        video,
        segmenter,
        mask_path=paths["mask.mp4"],
        overlay_path=paths["overlay.mp4"],
        csv_path=paths["frames.csv"],
        chunk_frames=7,  # chunks that do not divide 100
        progress=done.append,
    )
    assert done[-1] == 100 and summary.frames == 100 and summary.written_frames == 100
    # Segmenting each frame read back from the lazy video, as a plain 2D image.
    expected = np.stack([segmenter.segment(video[i]) for i in range(100)])
    masks = vid.open_video(paths["mask.mp4"])
    assert masks.shape == (100, 360, 448, 3) and masks.rate == video.rate
    got = np.stack(list(masks.iter_frames()))[..., 0]
    np.testing.assert_array_equal(got, expected * 255)
    overlay = vid.open_video(paths["overlay.mp4"])
    assert len(overlay) == len(video) and overlay.rate == video.rate
    with open(paths["frames.csv"], newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(vid.FRAME_CSV_COLUMNS) and len(rows) == 100
    for i in (0, 37, 99):
        assert int(rows[i]["frame"]) == i
        assert float(rows[i]["time_s"]) == pytest.approx(i / 25, rel=1e-6, abs=1e-9)
        assert int(rows[i]["area_px"]) == int(expected[i].sum())
    # The bundled model finds the sample's polyps (ground truth moved with the frames).
    truth = tifffile.imread(SAMPLE_MASKS) > 0
    dice = 2 * (truth & (expected > 0)).sum() / (truth.sum() + (expected > 0).sum())
    assert dice > 0.7, dice


@pytest.mark.slow
def test_segment_video_writes_nothing_on_error_or_cancel(segmenter, tmp_path: Path) -> None:
    from napari_lvunet.cancel import Cancelled

    mask = tmp_path / "m.mp4"
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        vid.segment_video(SAMPLE_VIDEO, segmenter, mask_path=mask, cancel=event)
    assert list(tmp_path.iterdir()) == []
    mask.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        vid.segment_video(SAMPLE_VIDEO, segmenter, mask_path=mask)
    assert mask.read_bytes() == b"mine"


@pytest.mark.gui
@pytest.mark.slow
def test_widget_segments_a_video_layer_frame_whole_and_live(make_napari_viewer, qtbot) -> None:
    from napari_lvunet.inference import default_pool

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(SAMPLE_VIDEO), plugin="napari-lvunet")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    assert widget.model.value == "lvunet-kvasir-seg"
    reference = default_pool().get("lvunet-kvasir-seg", device="cpu")
    video = layer.data

    def wait() -> None:
        qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)

    # The current frame: one frame decoded and segmented, like an image.
    widget.scope.value = "slice"
    viewer.dims.set_point(0, 40)
    decoded = video.decoded_frames
    widget.segment()
    wait()
    (one,) = [lay for lay in viewer.layers if lay.name == "kvasir_video labels"]
    assert one.data.shape == (100, 360, 448)
    np.testing.assert_array_equal(one.data[40], reference.segment(video[40]))
    assert not one.data[:40].any() and not one.data[41:].any()
    assert video.decoded_frames - decoded <= 2

    # The whole video, as a T stack: equal to segmenting each frame as an image.
    widget.scope.value = "stack"
    widget.segment()
    wait()
    whole = [lay for lay in viewer.layers if lay.name.startswith("kvasir_video labels")][-1]
    for i in (0, 55, 99):
        np.testing.assert_array_equal(whole.data[i], reference.segment(video[i]))


@pytest.mark.gui
@pytest.mark.slow
def test_live_preview_follows_scrubbing_through_a_video(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(SAMPLE_VIDEO), plugin="napari-lvunet")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    video = layer.data
    viewer.dims.set_point(0, 30)
    widget.live.value = True
    qtbot.waitUntil(lambda: "kvasir_video labels" in viewer.layers, timeout=120_000)
    labels = viewer.layers["kvasir_video labels"]
    qtbot.waitUntil(lambda: labels.data[30].any(), timeout=60_000)
    viewer.dims.set_point(0, 70)
    qtbot.waitUntil(lambda: labels.data[70].any(), timeout=60_000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    widget.live.value = False
    done = [i for i in range(100) if labels.data[i].any()]
    assert 30 in done and 70 in done and len(done) <= 4, done
    assert video.decoded_frames <= 10, "only the frames shown were decoded"
