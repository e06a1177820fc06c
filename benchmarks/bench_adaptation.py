"""A simulated new centre: how far do 20 corrected frames move the bundled model?

A second hospital's endoscope sees the same polyps with another camera: other colours,
less contrast, a softer image, another zoom. This script makes such a centre from
Kvasir-SEG's own images, fine-tunes the bundled model ``lvunet-kvasir-seg`` on 20 of its
frames with the real command line (``python -m training.finetune``, in a subprocess, so
that its defaults are what is measured), and scores the result:

* on the centre's other frames (does the model now work there?);
* on Kvasir-SEG test images that nothing here trains on (did it forget?);
* on the shipped reference set (``sample_data/reference``, the check the widget shows).

The centre (one FIXED shift, applied to every frame alike, masks moved with the image):

* zoom: the central 80 % of each side, shown at half the original resolution;
* blur: Gaussian, sigma 1 px at that resolution;
* colour: channel gains R 0.85, G 1.0, B 1.25 (a bluish, less red camera);
* contrast: gamma 0.8 (brighter), then contrast 0.7 around mid-grey;
* saved as JPEG, quality 90.

Its frames are Kvasir-SEG **val** images (the model was selected on val, never trained
on it): 20 seeded "corrected" frames, whose ground-truth masks play the user's
corrections, and 100 "other" frames that are only scored. Forgetting is scored on the
Kvasir-SEG **test** images that are not in the shipped reference set (so that replaying
nothing from test can leak into it), untouched. No other dataset is used.

Usage::

    python benchmarks/bench_adaptation.py                       # every variant
    python benchmarks/bench_adaptation.py --variants default,plain
    python benchmarks/bench_adaptation.py --list                # the variants

Each variant is a list of extra ``training.finetune`` options (``default`` adds none).
The table gives, per variant: the centre's Dice before/after, the Kvasir test Dice
before/after, the reference Dice after, the fine-tune's wall time (the whole command:
start-up, data, evaluation, writing) and its optimiser steps, and the load average
around the run: other processes on the machine slow every figure down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.reference import (  # noqa: E402
    ReferencePair,
    list_pairs,
    reference_pairs,
    score_pairs,
)

BASE = "lvunet-kvasir-seg"
KVASIR = Path("/work/shared/datasets/kvasir-seg")

#: The fixed shift of the simulated centre.
SHIFT = {
    "crop": 0.8,  # central share of each side kept (zoom in)
    "scale": 0.5,  # resolution of the centre's camera, relative to Kvasir-SEG's
    "sigma": 1.0,  # Gaussian blur, px at the centre's resolution
    "gains": (0.85, 1.0, 1.25),  # R, G, B
    "gamma": 0.8,
    "contrast": 0.7,
    "jpeg_quality": 90,
}

#: Variants: extra options of ``python -m training.finetune``.
VARIANTS: dict[str, list[str]] = {
    # the defaults before this work (issue 11): 30 epochs, lr 1e-4, batch 8, no replay
    "old-defaults": [
        "--epochs", "30", "--lr", "1e-4", "--lr-scale", "absolute", "--replay", "0",
        "--changed-weight", "1", "--augment", "mild",
    ],
    # the defaults of the first answer to issue 11: one Adam learning rate for every tensor
    "absolute-lr": ["--lr", "5e-4", "--lr-scale", "absolute"],
    # whatever the command does by default now
    "default": [],
    # the default schedule without the levers against forgetting (plain fine-tuning)
    "plain": ["--replay", "0", "--changed-weight", "1"],
    "no-replay": ["--replay", "0"],
    "no-weight": ["--changed-weight", "1"],
    "no-recolour": ["--recolour", "0"],
    # the defaults with other seeds (another held-out split, sampling and augmentation)
    "seed-1": ["--seed", "1"],
    "seed-2": ["--seed", "2"],
    "mild-augment": ["--augment", "mild"],
    # longer schedules: does more of the same schedule move the centre further?
    "steps-200": ["--steps", "200"],
    "steps-300": ["--steps", "300"],
    "lr-1e-3": ["--lr", "1e-3"],
    "lr-1e-2": ["--lr", "1e-2"],
}  # fmt: skip


def shift_frame(image: Image.Image, mask: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Apply :data:`SHIFT` to one RGB frame and its mask; returns uint8 RGB and bool."""
    w, h = image.size
    cw, ch = round(w * SHIFT["crop"]), round(h * SHIFT["crop"])
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    size = (round(cw * SHIFT["scale"]), round(ch * SHIFT["scale"]))
    image = image.crop(box).resize(size, Image.BILINEAR)
    mask = mask.crop(box).resize(size, Image.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(SHIFT["sigma"]))
    a = np.asarray(image, np.float32) / 255.0
    a = np.clip(a * np.asarray(SHIFT["gains"], np.float32), 0.0, 1.0) ** SHIFT["gamma"]
    a = 0.5 + SHIFT["contrast"] * (a - 0.5)
    rgb = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return rgb, np.asarray(mask) >= 128


def make_centre(kvasir: Path, work: Path, n_corrected: int, n_other: int, seed: int) -> None:
    """Write ``work/centre/{corrected,other}/{images,masks}`` (once; reused after)."""
    stamp = work / "centre" / "made.json"
    recipe = {"shift": SHIFT, "n_corrected": n_corrected, "n_other": n_other, "seed": seed}
    recipe = json.loads(json.dumps(recipe))  # as read back (the gains' tuple is a list)
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return
    val = sorted(json.loads((kvasir / "splits.json").read_text())["val"])
    order = list(np.random.RandomState(seed).permutation(val))
    if n_corrected + n_other > len(order):
        raise SystemExit(f"the val split has {len(order)} images: ask for fewer")
    parts = {"corrected": order[:n_corrected], "other": order[n_corrected : n_corrected + n_other]}
    for part, stems in parts.items():
        for sub in ("images", "masks"):
            folder = work / "centre" / part / sub
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():
                old.unlink()
        for stem in stems:
            image = Image.open(kvasir / "images" / f"{stem}.jpg").convert("RGB")
            mask = Image.open(kvasir / "masks" / f"{stem}.jpg").convert("L")
            rgb, m = shift_frame(image, mask)
            Image.fromarray(rgb).save(
                work / "centre" / part / "images" / f"{stem}.jpg", quality=SHIFT["jpeg_quality"]
            )
            Image.fromarray(m.astype(np.uint8) * 255).save(
                work / "centre" / part / "masks" / f"{stem}.png"
            )
    stamp.write_text(json.dumps(recipe))


def kvasir_test_pairs(kvasir: Path) -> list[ReferencePair]:
    """Kvasir-SEG test images, minus those of the shipped reference set."""
    shipped = {p.stem for p in reference_pairs()}
    test = json.loads((kvasir / "splits.json").read_text())["test"]
    return [
        ReferencePair(s, kvasir / "images" / f"{s}.jpg", kvasir / "masks" / f"{s}.jpg")
        for s in sorted(test)
        if s not in shipped
    ]


def run_finetune(data: Path, out: Path, extra: list[str], log: Path) -> dict:
    """Run the fine-tune command; returns its done event, wall time and steps."""
    cmd = [
        sys.executable, "-m", "training.finetune", "--data", str(data), "--weights", BASE,
        "--out", str(out), "--progress", "json", "--device", "cpu", *extra,
    ]  # fmt: skip
    load0 = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    events = [json.loads(x[8:]) for x in proc.stdout.splitlines() if x.startswith("@lvunet ")]
    done = [e for e in events if e["event"] == "done"]
    if proc.returncode != 0 or not done:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}): {tail}; see {log}")
    steps = [e for e in events if e["event"] == "step"]
    return {
        "weights": done[0]["weights"],
        "wall_s": wall,
        "cpu_s": cpu,
        "steps": steps[-1]["step"] if steps else 0,
        "heldout_before": done[0]["heldout_dice_before"],
        "heldout_after": done[0]["heldout_dice_after"],
        "load": (load0, os.getloadavg()[0]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kvasir", type=Path, default=KVASIR, help="Kvasir-SEG folder")
    p.add_argument("--work", type=Path, default=Path("/tmp/lvunet-bench-adaptation"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument("--n-corrected", type=int, default=20)
    p.add_argument("--n-other", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args(argv)
    if args.list:
        for name, extra in VARIANTS.items():
            print(f"{name:14s} {' '.join(extra) or '(the command defaults)'}")
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; see --list")

    make_centre(args.kvasir, args.work, args.n_corrected, args.n_other, args.seed)
    centre_other = list_pairs(args.work / "centre" / "other")
    kvasir_test = kvasir_test_pairs(args.kvasir)
    reference = reference_pairs()
    print(
        f"centre: {args.n_corrected} corrected + {len(centre_other)} other shifted val frames; "
        f"Kvasir test: {len(kvasir_test)} images (not in the reference set); "
        f"reference: {len(reference)} images; CPU cores: {os.cpu_count()}",
        flush=True,
    )

    def scores(weights: str) -> dict[str, float]:
        return {
            "centre": score_pairs(weights, centre_other).dice,
            "kvasir": score_pairs(weights, kvasir_test).dice,
            "reference": score_pairs(weights, reference).dice,
        }

    before = scores(BASE)
    print(
        f"bundled model: centre {before['centre']:.4f}  Kvasir test {before['kvasir']:.4f}  "
        f"reference {before['reference']:.4f}",
        flush=True,
    )
    rows = []
    for name in names:
        out = args.work / "runs" / name
        out.mkdir(parents=True, exist_ok=True)
        run = run_finetune(
            args.work / "centre" / "corrected", out, VARIANTS[name], out / "finetune.log"
        )
        after = scores(run["weights"])
        row = {"variant": name, "options": VARIANTS[name], **run, "after": after}
        rows.append(row)
        print(
            f"{name}: centre {after['centre']:.4f}  Kvasir test {after['kvasir']:.4f}  "
            f"reference {after['reference']:.4f}  {run['wall_s']:.0f} s "
            f"(CPU {run['cpu_s']:.0f} s)  "
            f"{run['steps']} steps  "
            f"load {run['load'][0]:.1f}->{run['load'][1]:.1f}",
            flush=True,
        )

    print()
    header = (
        f"| {'variant':14s} | centre before | centre after | Kvasir test before | "
        f"Kvasir test after | drop | reference after | wall s | CPU s | steps | load avg |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        a = r["after"]
        print(
            f"| {r['variant']:14s} | {before['centre']:13.4f} | {a['centre']:12.4f} | "
            f"{before['kvasir']:18.4f} | {a['kvasir']:17.4f} | "
            f"{before['kvasir'] - a['kvasir']:+.4f} | {a['reference']:15.4f} | "
            f"{r['wall_s']:6.0f} | {r['cpu_s']:5.0f} | {r['steps']:5d} | "
            f"{r['load'][0]:3.1f}-{r['load'][1]:3.1f} |"
        )
    print(f"\nreference before: {before['reference']:.4f}; targets: centre after >= 0.85, "
          "Kvasir drop <= 0.02, wall <= 300 s on the 2-core CPU")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"before": before, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
