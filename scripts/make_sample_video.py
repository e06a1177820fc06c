"""Build the sample video: a slow pan and zoom over Kvasir-SEG test-split frames.

Launch (from the repository root)::

    python scripts/make_sample_video.py --data ../shared/datasets/kvasir-seg

Writes ``sample_data/kvasir_video.mp4`` (H.264, 25 fps, 360 x 448, 4 s: three test
frames, each seen through a window that drifts and zooms in, as an endoscope's view does,
joined by short cross-fades) and ``sample_data/kvasir_video_masks.tif``, the ground-truth
masks moved the same way, ``(100, 360, 448)`` uint8 0/1. Frames come from the test split
(``splits.json``), so the bundled model has never seen them. The choice is fixed: the
first three test ids, in sorted order, whose polyp covers 8 to 35 % of the image.
Existing files are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from napari_lvunet.io import atomic_write, read_image, staged_files  # noqa: E402
from napari_lvunet.video import VideoWriter  # noqa: E402

FPS = 25
CRF = 20  # a little better than x264's default: the file stays well under 1 MB
HEIGHT, WIDTH = 360, 448
FRAMES_PER_SHOT = 40
FADE = 10  # frames shared by two shots (cross-fade)
N_SHOTS = 3
N_FRAMES = N_SHOTS * FRAMES_PER_SHOT - (N_SHOTS - 1) * FADE  # 100 frames, 4 s
POLYP_SHARE = (0.08, 0.35)


def pick_ids(data: Path) -> list[str]:
    """The first ``N_SHOTS`` sorted test ids whose polyp covers ``POLYP_SHARE``."""
    test = sorted(json.loads((data / "splits.json").read_text())["test"])
    chosen = []
    for stem in test:
        mask = read_image(data / "masks" / f"{stem}.jpg", mask=True)
        share = float(((mask[..., 0] if mask.ndim == 3 else mask) > 127).mean())
        if POLYP_SHARE[0] <= share <= POLYP_SHARE[1]:
            chosen.append(stem)
        if len(chosen) == N_SHOTS:
            return chosen
    raise SystemExit(f"fewer than {N_SHOTS} test images with a polyp share in {POLYP_SHARE}")


def shot(
    image: Image.Image, mask: Image.Image, n: int, seed: int
) -> list[tuple[Image.Image, Image.Image]]:
    """``n`` frames through a window that drifts and zooms in smoothly (ease in-out)."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    aspect = WIDTH / HEIGHT
    # The largest window of the output's aspect, then zoom from 100 % to 75 % of it.
    full_w = min(w, h * aspect)
    start_c = np.array([w / 2, h / 2]) + rng.uniform(-0.08, 0.08, 2) * (w, h)
    end_c = np.array([w / 2, h / 2]) + rng.uniform(-0.12, 0.12, 2) * (w, h)
    frames = []
    for i in range(n):
        t = i / max(1, n - 1)
        ease = 0.5 - 0.5 * np.cos(np.pi * t)
        win_w = full_w * (1.0 - 0.25 * ease)
        win_h = win_w / aspect
        cx, cy = start_c + (end_c - start_c) * ease
        cx = float(np.clip(cx, win_w / 2, w - win_w / 2))
        cy = float(np.clip(cy, win_h / 2, h - win_h / 2))
        box = (cx - win_w / 2, cy - win_h / 2, cx + win_w / 2, cy + win_h / 2)
        frames.append(
            (
                image.transform(
                    (WIDTH, HEIGHT), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR
                ),
                mask.transform(
                    (WIDTH, HEIGHT), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR
                ),
            )
        )
    return frames


def build(data: Path) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    ids = pick_ids(data)
    shots = []
    for k, stem in enumerate(ids):
        image = Image.fromarray(read_image(data / "images" / f"{stem}.jpg")).convert("RGB")
        raw = read_image(data / "masks" / f"{stem}.jpg", mask=True)
        raw = raw[..., 0] if raw.ndim == 3 else raw
        mask = Image.fromarray(((raw > 127) * 255).astype(np.uint8))
        shots.append(shot(image, mask, FRAMES_PER_SHOT, seed=k))
    frames: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for k, pairs in enumerate(shots):
        for i, (img, msk) in enumerate(pairs):
            rgb = np.asarray(img, np.float32)
            m = np.asarray(msk, np.float32)
            if k > 0 and i < FADE:  # cross-fade from the previous shot's last frames
                a = (i + 1) / (FADE + 1)
                j = len(frames) - FADE + i
                frames[j] = ((1 - a) * frames[j] + a * rgb).round().astype(np.uint8)
                # The mask follows the frame that dominates.
                masks[j] = (m > 127).astype(np.uint8) if a >= 0.5 else masks[j]
                continue
            frames.append(rgb.round().astype(np.uint8))
            masks.append((m > 127).astype(np.uint8))
    assert len(frames) == N_FRAMES
    return frames, np.stack(masks), ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the Kvasir-SEG folder")
    parser.add_argument("--out", type=Path, default=ROOT / "sample_data", help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    frames, masks, ids = build(args.data)
    video_path = args.out / "kvasir_video.mp4"
    masks_path = args.out / "kvasir_video_masks.tif"
    with (
        staged_files([video_path], overwrite=args.overwrite) as (tmp,),
        VideoWriter(tmp, fps=FPS, crf=CRF, preset="slow") as writer,
    ):
        for frame in frames:
            writer.write(frame)

    import tifffile

    atomic_write(
        masks_path,
        lambda f: tifffile.imwrite(f, masks, photometric="minisblack", compression="zlib"),
        overwrite=args.overwrite,
    )
    size = video_path.stat().st_size
    print(f"wrote {video_path} ({size / 1e6:.2f} MB, {len(frames)} frames) and {masks_path}")
    print("ids:", ", ".join(ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
