"""The ``napari-lvunet`` command: real files in, real PNG/TIFF/MP4/CSV files out, one-line
errors, documented exit statuses (0 all done, 1 some input failed, 2 bad usage).

Single-image tests use a real fused LV-UNet written with ``weights.save_weights`` on the
PyTorch backend (``--backend torch``), so that no test pays for an ONNX export (the ONNX
Runtime path is tested in test_inference.py); batch tests use the bundled model, which
ships its ONNX graph. The interrupted run is a real child process, killed. The GUI test
runs under Xvfb.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_lvunet import cli
from napari_lvunet.inference import Segmenter, default_pool
from napari_lvunet.model import LVUNet
from napari_lvunet.preprocess import normalize
from napari_lvunet.video import open_video
from napari_lvunet.weights import load_model, save_weights

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEO = ROOT / "sample_data" / "kvasir_video.mp4"


def disk_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.empty((height, width, 3), np.uint8)
    img[...] = rng.integers(0, 90, 3)
    for _ in range(3):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = rng.integers(min(height, width) // 10, min(height, width) // 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(150, 256, 3)
    return img


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fused weights of an LV-UNet whose BatchNorms saw synthetic images (varied output)."""
    torch.manual_seed(2)
    model = LVUNet()
    model.set_act_learn(1.0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    batch = np.stack([disk_image(256, 256, s) for s in range(4)])
    model.train()
    with torch.no_grad():
        model(normalize(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0))
    path = tmp_path_factory.mktemp("weights") / "test-model.safetensors"
    return save_weights(model.eval(), path, {"dataset": "synthetic disks (test)"})


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "scan 1.png"
    Image.fromarray(disk_image(200, 240, seed=1)).save(path)
    return path


def run(*args: str | Path) -> int:
    return cli.main([str(a) for a in args])


def test_segment_writes_mask_and_overlay(
    image_file: Path, weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "new"
    rc = run("segment", image_file, "--weights", weights_file, "--out", out, "--backend", "torch")
    assert rc == 0
    mask_path, overlay_path = out / "scan 1_mask.png", out / "scan 1_overlay.png"
    printed = capsys.readouterr().out
    assert f"wrote {mask_path}" in printed and f"wrote {overlay_path}" in printed
    mask = np.asarray(Image.open(mask_path))
    image = np.asarray(Image.open(image_file))
    expected = Segmenter(load_model(weights_file), backend="torch").segment(image)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask, expected * 255)
    overlay = np.asarray(Image.open(overlay_path))
    assert overlay.shape == (200, 240, 3)
    # Background pixels away from any object keep the image's colour; objects change.
    assert np.any(overlay[expected > 0] != image[expected > 0])
    assert (overlay == (255, 255, 0)).all(axis=-1).any(), "outlines are drawn"


def test_existing_outputs_are_kept_unless_overwrite(
    image_file: Path, weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = tmp_path / "scan 1_overlay.png"
    overlay.write_bytes(b"hand-made overlay")
    args = ["segment", image_file, "--weights", weights_file, "--out", tmp_path]
    assert run(*args, "--backend", "torch") == 1
    err = capsys.readouterr().err
    # Found before any work: one line, and the mask is not written without its overlay.
    assert err.count("\n") == 1 and "exists; pass --resume" in err and "--overwrite" in err
    assert overlay.read_bytes() == b"hand-made overlay"
    assert not (tmp_path / "scan 1_mask.png").exists(), "nothing written when one output exists"
    assert run(*args, "--backend", "torch", "--overwrite") == 0
    assert overlay.read_bytes() != b"hand-made overlay"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_instances_and_tiles(image_file: Path, weights_file: Path, tmp_path: Path) -> None:
    args = ["--weights", weights_file, "--out", tmp_path, "--backend", "torch"]
    assert run("segment", image_file, *args, "--output", "instances", "--sizing", "tiles") == 0
    mask = np.asarray(Image.open(tmp_path / "scan 1_mask.png"))
    image = np.asarray(Image.open(image_file))
    expected = Segmenter(load_model(weights_file), backend="torch").segment(
        image, output="instances", sizing="tiles"
    )
    np.testing.assert_array_equal(mask, expected)
    assert mask.max() >= 1


def test_tiff_stack_gives_a_tiff_mask(weights_file: Path, tmp_path: Path) -> None:
    stack = np.stack([disk_image(96, 128, s)[..., 0].astype(np.uint16) * 100 for s in range(3)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    assert (
        run("segment", path, "--weights", weights_file, "--out", tmp_path, "--backend", "torch")
        == 0
    )
    mask = tifffile.imread(tmp_path / "stack_mask.tif")
    assert mask.shape == (3, 96, 128) and set(np.unique(mask)) <= {0, 255}
    assert not (tmp_path / "stack_overlay.png").exists()


@pytest.mark.parametrize("mode", ["LA", "1"])
def test_grey_alpha_and_one_bit_pngs_read_as_grey(mode: str, tmp_path: Path) -> None:
    # Read as (H, W, 2) an LA file would pass for a stack of H slices of W x 2 pixels.
    grey = disk_image(64, 80, 0)[..., 0]
    path = tmp_path / f"{mode}.png"
    Image.fromarray(grey).convert(mode).save(path)
    image = cli.read_image(path)
    assert image.shape == (64, 80) and image.dtype == np.uint8


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: d, "no images or videos in the folder"),
        (lambda d: _write(d / "notes.png", b"plain text"), "cannot read"),
        (lambda d: _tiff(d / "nan.tif", np.full((64, 64), np.nan, np.float32)), "NaN or infinite"),
        (
            lambda d: _tiff(d / "cplx.tif", np.zeros((64, 64), np.complex64)),
            "unsupported image dtype",
        ),
    ],
)
def test_bad_images_give_one_line_errors(
    make, message: str, weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--weights", weights_file, "--out", tmp_path / "out", "--backend", "torch"]
    assert run("segment", make(tmp_path), *args) == 1
    # The error is the last line (progress lines may precede it) and the only one.
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("napari-lvunet: error: ") and message in lines[-1]
    assert sum("error" in line for line in lines) == 1


def test_bad_weights_and_options(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _write(tmp_path / "fake.safetensors", b"\x80\x04 not weights")
    assert run("segment", image_file, "--weights", fake, "--out", tmp_path) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fake.safetensors" in err
    assert run("segment", image_file, "--weights", tmp_path / "none.safetensors") == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        run("segment", image_file, "--sizing", "crop")
    assert exc.value.code == 2


def test_view_headless_segments_the_sample(
    weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = cli.sample_image_path()
    assert sample.is_file() and sample.suffix == ".jpg"
    args = ["--weights", weights_file, "--out", tmp_path, "--backend", "torch"]
    assert run("view", "--headless", *args) == 0
    assert (tmp_path / f"{sample.stem}_mask.png").is_file()
    assert (tmp_path / f"{sample.stem}_overlay.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_view_without_display_runs_segment(
    image_file: Path,
    weights_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    args = ["--weights", weights_file, "--out", tmp_path, "--backend", "torch"]
    assert run("view", image_file, *args) == 0
    printed = capsys.readouterr().out
    assert "no display found" in printed
    assert (tmp_path / "scan 1_mask.png").is_file()


def test_module_entry_point_reports_errors_on_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "napari_lvunet", "segment", str(tmp_path / "nope.jpg")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"napari-lvunet: error: no such file: {tmp_path / 'nope.jpg'}"
    ]


@pytest.mark.gui
def test_view_opens_napari_with_sample_and_widget(
    weights_file: Path, qtbot, mock_app_model
) -> None:
    # mock_app_model: napari's own fixture gives this test a fresh app model; a viewer
    # made by make_napari_viewer earlier in the session leaves the real one holding the
    # plugin's commands, and a second plugin initialisation there would clash.
    viewer = cli.open_viewer(weights=str(weights_file), show=False)
    try:
        assert [layer.name for layer in viewer.layers][:1] == ["polyp"]
        (name,) = [n for n in viewer.window.dock_widgets if "LV-UNet segmentation" in n]
        widget = viewer.window.dock_widgets[name]
        assert widget.model.value == str(weights_file.resolve())  # --weights is selected
    finally:
        viewer.close()


# --------------------------------------------------------------------------- batches


def polyp_folder(folder: Path, n: int, *, bad: bool = False) -> Path:
    """``n`` different crops of the sample polyp image as JPEG/PNG files (+ a corrupt one)."""
    image = cli.read_image(cli.sample_image_path())
    rng = np.random.default_rng(n)
    folder.mkdir(parents=True)
    for i in range(n):
        y, x = rng.integers(0, 200), rng.integers(0, 250)
        crop = image[y : y + 300, x : x + 340]
        Image.fromarray(crop).save(folder / f"frame{i:03d}.{'png' if i % 3 else 'jpg'}")
    if bad:
        (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
    return folder


def summary_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_folder_with_a_corrupt_file_exits_1_and_writes_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = polyp_folder(tmp_path / "data", 3, bad=True)
    out = tmp_path / "out"
    assert run("segment", data, "--out", out, "--device", "cpu") == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert errors == [
        f"napari-lvunet: error: cannot read {data / 'corrupt.jpg'} as an image: "
        + errors[0].split(" as an image: ", 1)[1]
    ]
    assert captured.err.splitlines()[-1] == "napari-lvunet: 3 segmented, 0 skipped, 1 failed"
    segmenter = default_pool().get("lvunet-kvasir-seg", device="cpu")
    for i in range(3):
        source = next(data.glob(f"frame{i:03d}.*"))
        mask = np.asarray(Image.open(out / f"frame{i:03d}_mask.png"))
        np.testing.assert_array_equal(mask, segmenter.segment(cli.read_image(source)) * 255)
        assert (out / f"frame{i:03d}_overlay.png").is_file()
        assert f"wrote {out / f'frame{i:03d}_mask.png'}" in captured.out
    rows = summary_rows(out / "summary.csv")
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok", "ok"]
    assert not list(out.glob("corrupt*"))


def test_video_gives_mask_video_and_frame_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("segment", SAMPLE_VIDEO, "--out", out, "--no-overlay", "--no-progress") == 0
    masks = open_video(out / "kvasir_video_mask.mp4")
    source = open_video(SAMPLE_VIDEO)
    assert masks.shape == source.shape and masks.rate == source.rate
    assert not (out / "kvasir_video_overlay.mp4").exists()
    frames = summary_rows(out / "kvasir_video_frames.csv")
    assert len(frames) == 100 and frames[99]["time_s"] == "3.960000"
    (row,) = summary_rows(out / "summary.csv")
    assert row["kind"] == "video" and row["frames"] == "100"
    assert int(row["area_px"]) == sum(int(f["area_px"]) for f in frames)


def test_resume_after_a_killed_run_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = polyp_folder(tmp_path / "data", 40)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run("segment", data, "--out", whole, "--device", "cpu", "--no-progress") == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "napari_lvunet", "segment", str(data), "--out"]
    child = subprocess.Popen(
        [*command, str(resumed), "--device", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # killed (no clean-up at all) as soon as its first image has landed
        deadline = time.monotonic() + 120
        while not list(resumed.glob("*_overlay.png")) and child.poll() is None:
            assert time.monotonic() < deadline, "the child wrote nothing in 2 minutes"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    landed = len(list(resumed.glob("*_mask.png")))
    assert 1 <= landed < 40, "killed part-way"
    # Whatever landed is whole: every mask has its overlay (they land together).
    assert len(list(resumed.glob("*_overlay.png"))) == landed
    assert run("segment", data, "--out", resumed, "--device", "cpu", "--resume") == 0
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir() if not p.name.startswith("."))
    for name in names:
        if name != "summary.csv":
            assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
    assert [r["status"] for r in summary_rows(resumed / "summary.csv")].count("skipped") == landed

    def without_status(folder: Path) -> list[dict[str, str]]:
        rows = summary_rows(folder / "summary.csv")
        return [{k: v for k, v in r.items() if k != "status"} for r in rows]

    assert without_status(whole) == without_status(resumed)


def test_overwrite_replaces_and_summary_keeps_other_inputs(
    image_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    other = polyp_folder(tmp_path / "other", 1)
    assert run("segment", image_file, "--out", out, "--device", "cpu") == 0
    first = (out / "scan 1_mask.png").stat().st_mtime_ns
    assert run("segment", other, "--out", out, "--device", "cpu") == 0
    assert [Path(r["input"]).name for r in summary_rows(out / "summary.csv")] == [
        "scan 1.png",
        "frame000.jpg",
    ]
    assert run("segment", image_file, "--out", out, "--device", "cpu", "--overwrite") == 0
    assert (out / "scan 1_mask.png").stat().st_mtime_ns != first
    assert len(summary_rows(out / "summary.csv")) == 2


@pytest.mark.parametrize("problem", ["collision", "unwritable", "foreign summary", "option"])
def test_usage_errors_exit_2_before_any_work(
    problem: str, image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args: list = ["segment", image_file, "--out", out]
    if problem == "collision":
        twin = tmp_path / "twin"
        twin.mkdir()
        (twin / "scan 1.png").write_bytes(image_file.read_bytes())
        args[1:2] = [image_file, twin / "scan 1.png"]
        message = "would both write"
    elif problem == "unwritable":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        args[-1] = blocker / "out"
        message = "cannot write to the output folder"
    elif problem == "foreign summary":
        out.mkdir()
        (out / "summary.csv").write_text("my own notes\n")
        message = "is not a napari-lvunet summary"
    else:
        args.append("--sizing=crop")
        message = "invalid choice"
    if problem == "option":
        with pytest.raises(SystemExit) as exc:
            run(*args)
        assert exc.value.code == 2
    else:
        assert run(*args) == 2
    assert message in capsys.readouterr().err
    assert not list(out.glob("*_mask.png")) if out.is_dir() else True
    if problem == "foreign summary":
        assert (out / "summary.csv").read_text() == "my own notes\n"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _tiff(path: Path, array: np.ndarray) -> Path:
    tifffile.imwrite(path, array)
    return path
