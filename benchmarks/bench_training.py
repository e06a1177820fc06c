"""Training throughput of LV-UNet on this machine (images per second, 256x256, batch 8).

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_training.py
    # with the authors' loop for comparison (their LV_UNet.py, losses.py and metrics.py in
    # AUTHORS_DIR, and timm importable, e.g. pip install --target DEPS timm):
    PYTHONPATH=.:DEPS .venv/bin/python benchmarks/bench_training.py --authors-repo AUTHORS_DIR

Rows:
    ours, compute only      forward + loss + backward + Adam on a ready batch, for each
                            precision (fp32 / bf16 autocast) and memory format.
    ours, full loop         ``training.train.train`` itself on generated images: uint8
                            cache, augmentation, DataLoader, metrics, at its defaults.
    authors' loop           their ``LV_UNet`` (ImageNet download patched away: random
                            encoder), their ``BCEDiceLoss`` and per-step ``iou_score``,
                            Adam, fp32 NCHW as in their ``train.py``, on a ready batch
                            (their albumentations data loading is left out, which
                            favours them).

The configurations are timed in interleaved rounds and the median is reported, so that
other load on a shared machine affects them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from napari_lvunet.model import LVUNet
from training.losses import BCEDiceLoss
from training.train import TrainConfig, train

Step = Callable[[], None]


def _ours(dtype: torch.dtype | None, channels_last: bool, batch: int, size: int) -> Step:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = LVUNet(1).to(memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = BCEDiceLoss(0.5)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size) > 0.7).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _authors(repo: Path, dtype: torch.dtype | None, batch: int, size: int) -> Step:
    import torchvision.models as tvm
    from torchvision.models.mobilenetv3 import mobilenet_v3_large

    def no_download(pretrained: bool = False, **kw: object) -> torch.nn.Module:
        return mobilenet_v3_large(weights=None, **kw)  # their code asks for ImageNet weights

    tvm.mobilenet_v3_large = no_download
    sys.path.insert(0, str(repo))
    try:
        from losses import BCEDiceLoss as TheirLoss
        from LV_UNet import LV_UNet  # their files, materialised outside this repo
        from metrics import iou_score
    finally:
        sys.path.remove(str(repo))
    model = LV_UNet().train()
    model.change_act(0.5)  # deep training, mid-schedule, as in their train.py
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = TheirLoss()
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch, 1, size, size) > 0.7).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out.float(), y)
        iou_score(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    return step


def _full_loop(batch: int, steps: int, workers: int) -> float:
    """Images/s of ``training.train`` itself (second epoch, data loading included)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        rng = np.random.default_rng(0)
        n = batch * steps + 2
        for i in range(n):
            img = (rng.random((360, 480, 3)) * 255).astype(np.uint8)
            mask = np.zeros((360, 480), np.uint8)
            mask[100:200, 150:300] = 255
            Image.fromarray(img).save(root / "images" / f"{i:03d}.jpg")
            Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
        stems = [f"{i:03d}" for i in range(n)]
        (root / "splits.json").write_text(json.dumps({"train": stems[:-2], "val": stems[-2:]}))
        cfg = TrainConfig(
            data=str(root), epochs=2, batch_size=batch, progress=False, num_workers=workers
        )
        run = train(cfg, Path(tmp) / "run")
        from training.checkpoint import load_checkpoint

        return float(load_checkpoint(run / "last.pt")["history"][-1]["train_images_per_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-repo", type=Path, help="folder with the authors' LV_UNet.py etc.")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (default 4)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[0, 1],
        help="DataLoader workers of the training.train rows (default 0 1; none: skip them)",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    b, s = args.batch, args.size
    configs: dict[str, Step] = {
        "ours, compute only, fp32, NCHW": _ours(None, False, b, s),
        "ours, compute only, fp32, channels_last": _ours(None, True, b, s),
        "ours, compute only, bf16, NCHW": _ours(torch.bfloat16, False, b, s),
        "ours, compute only, bf16, channels_last (default)": _ours(torch.bfloat16, True, b, s),
    }
    if args.authors_repo:
        configs["authors' loop, fp32 (their train.py)"] = _authors(args.authors_repo, None, b, s)
        configs["authors' model, bf16 autocast"] = _authors(args.authors_repo, torch.bfloat16, b, s)
    for step in configs.values():  # warm-up: allocator, oneDNN kernels
        step()
        step()
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, step in configs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * b / (time.perf_counter() - t0))
    rows = {name: statistics.median(r) for name, r in rates.items()}
    for workers in args.workers:
        rows[f"ours, full loop (training.train, workers={workers})"] = _full_loop(
            b, args.steps, workers
        )
    ref = rows.get("authors' loop, fp32 (their train.py)")
    print(
        f"\nLV-UNet training throughput, {s}x{s}, batch {b}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"| {'configuration':<56} | {'images/s':>8} | {'vs authors':>10} |")
    print(f"|{'-' * 58}|{'-' * 10}|{'-' * 12}|")
    for name, rate in rows.items():
        rel = f"{rate / ref:.2f}x" if ref else "-"
        print(f"| {name:<56} | {rate:>8.2f} | {rel:>10} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
