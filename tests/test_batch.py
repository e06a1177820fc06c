"""Batch segmentation (napari_lvunet.batch): folders, globs, videos, failures, resume.

Real files in temporary folders, the bundled model through the engine (ONNX Runtime on
the CPU), outputs read back from disk. The command line over the same code is tested in
test_cli.py.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_lvunet import batch
from napari_lvunet.io import read_image
from napari_lvunet.video import VideoWriter, open_video

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "kvasir_cju2hw5gjlr5h0988so2qqres.jpg"
SAMPLE_VIDEO = ROOT / "sample_data" / "kvasir_video.mp4"


@pytest.fixture(scope="module")
def segmenter():
    from napari_lvunet.inference import default_pool

    return default_pool().get("lvunet-kvasir-seg", device="cpu")


def crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """Different crops of the sample polyp image (each shows tissue, most the polyp)."""
    image = read_image(SAMPLE)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(200, 400), rng.integers(200, 450)
        y, x = rng.integers(0, image.shape[0] - h), rng.integers(0, image.shape[1] - w)
        out.append(np.ascontiguousarray(image[y : y + h, x : x + w]))
    return out


def make_folder(folder: Path, n: int = 4, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(crops(n)):
        Image.fromarray(img).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


def run(
    arguments, out: Path, segmenter, *, recursive: bool = False, **options
) -> list[dict[str, str]]:
    opts = batch.BatchOptions(**options)
    inputs, problems = batch.collect_inputs([str(a) for a in arguments], recursive=recursive)
    jobs = batch.plan_jobs(inputs, out, opts)
    batch.check_writable(out)
    return batch.run_batch(jobs, segmenter, opts, summary=out / "summary.csv", failures=problems)


def test_folder_with_a_corrupt_file(segmenter, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    rows = run([data], out, segmenter)
    status = {Path(r["input"]).name: r["status"] for r in rows}
    assert status == {"broken.png": "failed", **{f"img{i}.{e}": "ok" for i, e in
                                                  enumerate(["jpg", "png"] * 2)}}  # fmt: skip
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["error"].startswith(f"cannot read {data / 'broken.png'} as an image")
    for i in range(4):
        name = f"img{i}"
        image = read_image(next(data.glob(f"{name}.*")))
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        expected = segmenter.segment(image)
        np.testing.assert_array_equal(mask, expected * 255)
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == image.shape
    assert not (out / "broken_mask.png").exists()
    with open(out / "summary.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert [r["input"] for r in table] == [r["input"] for r in rows]
    row = next(r for r in table if r["input"].endswith("img0.jpg"))
    mask = np.asarray(Image.open(out / "img0_mask.png")) > 0
    assert int(row["area_px"]) == mask.sum() and int(row["frames"]) == 1
    assert float(row["area_fraction"]) == pytest.approx(mask.mean(), rel=1e-5)
    assert 0.5 < float(row["mean_probability"]) <= 1.0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_resume_after_an_interruption_gives_the_same_outputs(segmenter, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=5)
    whole = tmp_path / "whole"
    run([data], whole, segmenter)

    class Interrupted:  # the engine, stopped (Ctrl-C) during the fourth image
        num_classes = segmenter.num_classes

        def __init__(self) -> None:
            self.calls = 0

        def segment(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt
            return segmenter.segment(*args, **kwargs)

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run([data], resumed, Interrupted())
    done = sorted(p.name for p in resumed.glob("*_mask.png"))
    assert done == ["img0_mask.png", "img1_mask.png", "img2_mask.png"]
    assert (resumed / "summary.csv").is_file(), "the summary is written on the way out"
    rows = run([data], resumed, segmenter, resume=True)
    assert [r["status"] for r in rows].count("skipped") == 3
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in resumed.iterdir())
    for path in whole.iterdir():
        if path.name == "summary.csv":
            continue
        assert path.read_bytes() == (resumed / path.name).read_bytes(), path.name

    def table(folder: Path) -> list[dict[str, str]]:
        with open(folder / "summary.csv", newline="") as file:
            return [{k: v for k, v in r.items() if k != "status"} for r in csv.DictReader(file)]

    assert table(whole) == table(resumed)


def test_existing_outputs_need_resume_or_overwrite(segmenter, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", n=2, bad=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0_overlay.png").write_bytes(b"hand-made")
    rows = run([data], out, segmenter)
    by_name = {Path(r["input"]).name: r for r in rows}
    assert by_name["img0.jpg"]["status"] == "failed"
    assert "exists; pass --resume" in by_name["img0.jpg"]["error"]
    assert by_name["img1.png"]["status"] == "ok"
    assert (out / "img0_overlay.png").read_bytes() == b"hand-made"
    assert not (out / "img0_mask.png").exists()
    # Only some outputs of img0: --resume does not guess, --overwrite redoes it.
    rows = run([data], out, segmenter, resume=True)
    by_name = {Path(r["input"]).name: r for r in rows}
    assert by_name["img1.png"]["status"] == "skipped"
    assert "pass --overwrite to redo it" in by_name["img0.jpg"]["error"]
    rows = run([data], out, segmenter, overwrite=True)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert (out / "img0_overlay.png").read_bytes() != b"hand-made"


def test_globs_recursive_folders_and_collisions(segmenter, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for sub in ("a", "b"):
        make_folder(data / sub, n=1, bad=False)
    out = tmp_path / "out"
    rows = run([str(data / "**" / "*.jpg")], out, segmenter, overlay=False)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert (out / "a" / "img0_mask.png").is_file() and (out / "b" / "img0_mask.png").is_file()
    assert not list(out.rglob("*_overlay.png"))
    inputs, problems = batch.collect_inputs([data], recursive=True)
    assert len(inputs) == 2 and problems == []
    inputs, problems = batch.collect_inputs([data])
    assert inputs == [] and "no images or videos" in problems[0][1]
    inputs, problems = batch.collect_inputs([data / "a" / "img0.jpg", data / "b" / "img0.jpg"])
    with pytest.raises(batch.BatchError, match="would both write"):
        batch.plan_jobs(inputs, out, batch.BatchOptions())
    _, problems = batch.collect_inputs([str(tmp_path / "*.nothing"), tmp_path / "none.png"])
    assert [m.split(":")[0] for _, m in problems] == ["no images or videos match " +
                                                       str(tmp_path / "*.nothing"),
                                                       "no such file"]  # fmt: skip


def test_video_and_stack_inputs(segmenter, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    video = open_video(SAMPLE_VIDEO)
    with VideoWriter(data / "clip.mkv", fps=video.rate) as writer:
        for i in range(12):
            writer.write(video[i])
    stack = np.stack(crops(3, seed=4)[0][None].repeat(3, 0))
    tifffile.imwrite(data / "stack.tif", stack)
    out = tmp_path / "out"
    rows = run([data], out, segmenter)
    by_name = {Path(r["input"]).name: r for r in rows}
    assert by_name["clip.mkv"]["status"] == "ok" and by_name["stack.tif"]["status"] == "ok"
    assert by_name["clip.mkv"]["kind"] == "video" and by_name["clip.mkv"]["frames"] == "12"
    masks = open_video(out / "clip_mask.mp4")
    overlays = open_video(out / "clip_overlay.mp4")
    assert len(masks) == len(overlays) == 12 and masks.rate == overlays.rate == 25
    with open(out / "clip_frames.csv", newline="") as file:
        frames = list(csv.DictReader(file))
    assert sum(int(f["area_px"]) for f in frames) == int(by_name["clip.mkv"]["area_px"])
    mask = tifffile.imread(out / "stack_mask.tif")
    assert mask.shape == stack.shape[:3] and by_name["stack.tif"]["frames"] == "3"
    np.testing.assert_array_equal(mask, segmenter.segment(stack) * 255)
    # Resumed: the rows come back from the outputs themselves.
    again = run([data], out, segmenter, resume=True)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    for old, new in zip(rows, again, strict=True):
        assert {k: v for k, v in old.items() if k != "status"} == {
            k: v for k, v in new.items() if k != "status"
        }


def test_huge_images_get_a_preview_overlay(segmenter, tmp_path: Path) -> None:
    image = np.zeros((4200, 96, 3), np.uint8)
    image[1000:3000, 20:70] = 200
    path = tmp_path / "tall.png"
    Image.fromarray(image).save(path)
    out = tmp_path / "out"
    rows = run([path], out, segmenter)
    assert rows[0]["status"] == "ok"
    assert Image.open(out / "tall_mask.png").size == (96, 4200)
    assert Image.open(out / "tall_overlay.png").size == (48, 2100)


def test_unwritable_output_folder_is_refused_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    with pytest.raises(batch.BatchError, match="cannot write to the output folder"):
        batch.check_writable(blocker / "out")
