"""Make the model card's figures from an evaluation CSV and the weights.

Reads the per-image metrics that ``python -m training.evaluate --csv`` wrote, plots the
per-image Dice histogram, and draws qualitative examples (image, ground truth and
prediction outlines) for the best, median and worst test images by Dice::

    python -m training.evaluate --data ../shared/datasets/kvasir-seg --weights lvunet-kvasir-seg \
        --split test --csv /tmp/test.csv
    python docs/make_model_card_figures.py --csv /tmp/test.csv \
        --data ../shared/datasets/kvasir-seg --weights lvunet-kvasir-seg
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from skimage.segmentation import find_boundaries

from napari_lvunet.inference import Segmenter
from napari_lvunet.weights import load_model
from training.data import find_pairs, load_pair, read_array

HERE = Path(__file__).resolve().parent / "model_card"


def _rows(path: Path, model: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model]
    if not rows:
        raise SystemExit(f"no rows for model {model!r} in {path}")
    return sorted(rows, key=lambda r: float(r["dice"]))


def histogram(rows: list[dict[str, str]], out: Path) -> None:
    dice = np.array([float(r["dice"]) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(dice, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax.axvline(dice.mean(), color="tab:red", label=f"mean {dice.mean():.3f}")
    ax.axvline(np.median(dice), color="tab:orange", ls="--", label=f"median {np.median(dice):.3f}")
    ax.set_xlabel("per-image Dice (test split, original resolution)")
    ax.set_ylabel("images")
    ax.set_title(f"Kvasir-SEG test split, n = {len(dice)}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def examples(rows: list[dict[str, str]], data: Path, weights: str, out: Path) -> None:
    picks = [("best", rows[-1]), ("median", rows[len(rows) // 2]), ("worst", rows[0])]
    pairs = {p.stem: p for p in find_pairs(data)}
    segmenter = Segmenter(load_model(weights), device="cpu")
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.8), dpi=120)
    for ax, (what, row) in zip(axes, picks, strict=True):
        pair = pairs[row["stem"]]
        image = read_array(pair.image)  # uint8 RGB, as a user's file reaches the plugin
        mask = load_pair(pair)[1]
        pred = segmenter.segment(image, axes="YXC")
        shown = image[..., :3].copy()
        shown[find_boundaries(mask > 0, mode="thick")] = (0, 255, 0)
        shown[find_boundaries(pred > 0, mode="thick")] = (255, 0, 255)
        ax.imshow(shown)
        ax.set_title(f"{what}: Dice {float(row['dice']):.3f}", fontsize=10)
        ax.axis("off")
    fig.suptitle("green: ground truth, magenta: LV-UNet prediction", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csv", type=Path, required=True, help="per-image CSV of training.evaluate")
    p.add_argument("--data", type=Path, required=True, help="the dataset folder")
    p.add_argument("--weights", default="lvunet-kvasir-seg", help="registry name or file")
    p.add_argument("--model", default="fused", help="which model's rows to plot (default fused)")
    args = p.parse_args()
    HERE.mkdir(exist_ok=True)
    rows = _rows(args.csv, args.model)
    histogram(rows, HERE / "test_dice_histogram.png")
    examples(rows, args.data, args.weights, HERE / "test_examples.png")
    print(f"wrote {HERE / 'test_dice_histogram.png'} and {HERE / 'test_examples.png'}")


if __name__ == "__main__":
    main()
