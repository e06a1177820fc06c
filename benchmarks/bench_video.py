"""Video and folder throughput of the batch pipeline, and its memory over long videos.

Launch (from the repository root)::

    python benchmarks/bench_video.py                         # everything (about 15 min)
    python benchmarks/bench_video.py --quick                 # 20 s video, 200 images, 1 min
    python benchmarks/bench_video.py --images DIR            # another image folder

What is measured, with the bundled model on the CPU (ONNX Runtime), ``sizing="resize"``:

* a 1280 x 720, 25 fps H.264 video (a slow pan over the sample polyp image, so the
  encoder sees real texture), end to end through ``video.segment_video``: decode,
  segment, mask video written (lossless); then the same with the overlay video and the
  per-frame CSV too (what ``napari-lvunet segment VIDEO`` writes). Frames per second of
  wall time, model already loaded;
* a folder of images (default: the Kvasir-SEG images, 1,000 JPEGs of 332 x 487 to
  1920 x 1072 px, when ``../shared/datasets/kvasir-seg`` exists) through
  ``batch.run_batch``: masks only, then masks and overlays. Images per second;
* peak resident memory (``VmHWM``) of a fresh process that segments a 1-minute and a
  10-minute 1280 x 720 video (mask video, overlay video and CSV), generated in a
  temporary folder: flat memory means the two peaks are alike.

Targets (issue 12): >= 30 frames/s for the video, >= 40 images/s for the folder, memory
flat in the video's length. Other processes compete for the CPU: the load average is
printed with the table, and each rate comes with the CPU time it took per frame or image
(all threads of the process): 2000 / that is the rate two idle cores could reach at
most, a figure that other load barely changes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from napari_lvunet import batch  # noqa: E402
from napari_lvunet.inference import default_pool  # noqa: E402
from napari_lvunet.io import read_image  # noqa: E402
from napari_lvunet.video import VideoWriter, open_video, segment_video  # noqa: E402

KVASIR = ROOT.parent / "shared" / "datasets" / "kvasir-seg" / "images"
SAMPLE = ROOT / "sample_data" / "kvasir_cju2hw5gjlr5h0988so2qqres.jpg"
HEIGHT, WIDTH, FPS = 720, 1280, 25


def make_video(path: Path, seconds: float) -> Path:
    """A 1280 x 720, 25 fps video panning slowly over the sample image (enlarged)."""
    from PIL import Image

    base = Image.fromarray(read_image(SAMPLE)).resize((2 * WIDTH, 2 * HEIGHT))
    big = np.asarray(base)
    n = round(seconds * FPS)
    with VideoWriter(path, fps=FPS, preset="ultrafast") as writer:
        for i in range(n):
            t = 0.5 - 0.5 * np.cos(2 * np.pi * i / 250)  # back and forth every 10 s
            y, x = int(t * HEIGHT), int(t * WIDTH)
            writer.write(big[y : y + HEIGHT, x : x + WIDTH])
    return path


def _cpu_s() -> float:
    """CPU seconds of this process so far, every thread (FFmpeg's and ONNX Runtime's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def segmenter():
    return default_pool().get("lvunet-kvasir-seg", device="cpu")


def bench_video(folder: Path, seconds: float) -> dict[str, tuple[float, float]]:
    path = make_video(folder / "bench.mp4", seconds)
    seg = segmenter()
    seg.segment(np.zeros((HEIGHT, WIDTH, 3), np.uint8), sizing="resize")  # warm-up
    results = {}
    for name, extra in (("mask", {}), ("all", {"overlay": True, "csv": True})):
        out = folder / name
        out.mkdir()
        video = open_video(path)
        start, cpu = time.perf_counter(), _cpu_s()
        segment_video(
            video,
            seg,
            mask_path=out / "m.mp4",
            overlay_path=out / "o.mp4" if extra.get("overlay") else None,
            csv_path=out / "f.csv" if extra.get("csv") else None,
            sizing="resize",
        )
        elapsed, cpu = time.perf_counter() - start, _cpu_s() - cpu
        results[name] = (len(video) / elapsed, 1000 * cpu / len(video))
    return results


def bench_folder(
    images: Path, limit: int, folder: Path
) -> tuple[int, dict[str, tuple[float, float]]]:
    inputs, _ = batch.collect_inputs([images])
    inputs = inputs[:limit]
    seg = segmenter()
    seg.segment(np.zeros((256, 256, 3), np.uint8), sizing="resize")
    results = {}
    for name, overlay in (("masks", False), ("masks+overlays", True)):
        options = batch.BatchOptions(sizing="resize", overlay=overlay)
        out = folder / name
        jobs = batch.plan_jobs(inputs, out, options)
        batch.check_writable(out)
        start, cpu = time.perf_counter(), _cpu_s()
        rows = batch.run_batch(jobs, seg, options, summary=out / "summary.csv")
        elapsed, cpu = time.perf_counter() - start, _cpu_s() - cpu
        assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
        results[name] = (len(jobs) / elapsed, 1000 * cpu / len(jobs))
    return len(inputs), results


_MEMORY_CHILD = """
import resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from napari_lvunet.inference import default_pool
from napari_lvunet.video import segment_video
path, out = Path(sys.argv[2]), Path(sys.argv[3])
seg = default_pool().get("lvunet-kvasir-seg", device="cpu")
start = time.perf_counter()
summary = segment_video(path, seg, mask_path=out / "m.mp4", overlay_path=out / "o.mp4",
                        csv_path=out / "f.csv", sizing="resize")
elapsed = time.perf_counter() - start
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(summary.frames, elapsed, int(peak) / 1024)
sys.stdout.flush()
"""


def bench_memory(folder: Path, minutes: float) -> tuple[int, float, float]:
    path = make_video(folder / f"long{minutes:g}.mp4", minutes * 60)
    out = folder / f"out{minutes:g}"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(ROOT), str(path), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    frames, elapsed, peak = proc.stdout.split()
    path.unlink()
    for file in out.iterdir():
        file.unlink()
    return int(frames), float(frames) / float(elapsed), float(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 1 minute)")
    parser.add_argument("--images", type=Path, default=KVASIR, help="an image folder")
    parser.add_argument("--video-seconds", type=float, default=None)
    parser.add_argument(
        "--memory-minutes", type=float, nargs="*", default=None, help="default: 1 10"
    )
    parser.add_argument("--json", type=Path, help="also save the figures here")
    args = parser.parse_args()
    seconds = args.video_seconds or (20 if args.quick else 60)
    minutes = args.memory_minutes if args.memory_minutes is not None else (
        [0.5, 1] if args.quick else [1, 10]
    )  # fmt: skip
    limit = 200 if args.quick else 1000

    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        folder = Path(tmp)
        video = bench_video(folder, seconds)
        figures["video_fps"] = video
        if args.images.is_dir():
            n_images, images = bench_folder(args.images, limit, folder)
        else:
            print(f"(no image folder at {args.images}: folder benchmark skipped)")
            n_images, images = 0, {}
        figures["images_per_s"] = images
        memory = {m: bench_memory(folder, m) for m in minutes}
        figures["memory"] = {str(m): v for m, v in memory.items()}

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    print(f"\nnapari-lvunet video/batch benchmark: {cpu}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min)")  # fmt: skip
    print()
    # CPU ms per item (all threads): what a quiet machine's cores bound the rate by,
    # whatever else ran meanwhile ("2-core bound" = 2000 / CPU ms).
    print("| case | result | CPU ms each (2-core bound) | target |")
    print("|---|---|---|---|")
    for name, label in (("mask", "resize, mask video"), ("all", "+ overlay video + CSV")):
        rate, ms = video[name]
        target = ">= 30" if name == "mask" else ""
        print(f"| 1280x720 25 fps video ({seconds:g} s), {label} | {rate:.1f} frames/s | "
              f"{ms:.0f} ({2000 / ms:.0f}/s) | {target} |")  # fmt: skip
    for name, (rate, ms) in images.items():
        target = ">= 40" if name == "masks" else ""
        print(f"| {n_images} images from {args.images.name}/, {name} | {rate:.1f} images/s | "
              f"{ms:.0f} ({2000 / ms:.0f}/s) | {target} |")  # fmt: skip
    for m, (frames, fps, peak) in memory.items():
        print(f"| {m:g} min video ({frames} frames), all outputs: peak RSS | {peak:.0f} MB | "
              f"({fps:.1f} frames/s) | flat |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
