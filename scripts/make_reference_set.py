"""Build the shipped reference and replay sets (``sample_data/reference/``).

Launch (from the repository root)::

    python scripts/make_reference_set.py --data ../shared/datasets/kvasir-seg

Writes ``sample_data/reference/images/*.jpg`` + ``masks/*.png``: 32 Kvasir-SEG **test**
images (scored before and after a fine-tune, to catch forgetting), and
``sample_data/reference/replay/images/*.jpg`` + ``replay/masks/*.png``: 40 Kvasir-SEG
**train** images (mixed into fine-tuning batches, never scored). The choice is fixed:
``numpy.random.RandomState(0)`` permutations of the sorted split ids. Every image is
downsized (bilinear) so that its longest side is 320 px and saved as JPEG (quality 85);
its mask is resized the same way, binarised (``> 127``) and saved as a 0/255 PNG.
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
OUT = ROOT / "sample_data" / "reference"
LONGEST = 320
QUALITY = 85
COUNTS = {"test": 32, "train": 40}


def _write(kvasir: Path, stems: list[str], folder: Path, overwrite: bool) -> None:
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        image = Image.open(kvasir / "images" / f"{stem}.jpg").convert("RGB")
        mask = Image.open(kvasir / "masks" / f"{stem}.jpg").convert("L")
        scale = LONGEST / max(image.size)
        size = (round(image.size[0] * scale), round(image.size[1] * scale))
        image = image.resize(size, Image.BILINEAR)
        binary = np.asarray(mask.resize(size, Image.BILINEAR)) > 127
        targets = (folder / "images" / f"{stem}.jpg", folder / "masks" / f"{stem}.png")
        if not overwrite and any(t.exists() for t in targets):
            raise SystemExit(f"{targets[0].name} exists; pass --overwrite to replace it")
        image.save(targets[0], quality=QUALITY, optimize=True)
        Image.fromarray(binary.astype(np.uint8) * 255).save(targets[1], optimize=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the Kvasir-SEG folder")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    splits = json.loads((args.data / "splits.json").read_text())
    for split, folder in (("test", OUT), ("train", OUT / "replay")):
        ids = sorted(splits[split])
        chosen = sorted(np.random.RandomState(0).permutation(ids)[: COUNTS[split]].tolist())
        _write(args.data, chosen, folder, args.overwrite)
        print(f"{len(chosen)} {split} images -> {folder}")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{total / 1e6:.2f} MB in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
