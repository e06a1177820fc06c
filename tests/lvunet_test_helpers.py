"""Helpers shared by several test modules (importable: pytest puts tests/ on sys.path).

No torch at import: GUI test modules use these and keep their process torch-free.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

_MAKE_WEIGHTS = """
import sys, torch
from napari_lvunet.model import LVUNet
from napari_lvunet.weights import save_weights
torch.manual_seed(1)
model = LVUNet(act_num=1)
model.set_act_learn(1.0)
save_weights(model, sys.argv[1], {"dataset": "none: random weights for tests"})
"""


def weights_in_child(path: Path) -> Path:
    """Random LV-UNet weights at the end of deep training, fused and saved like a real
    model, made by a child process so that the calling test process never imports torch."""
    subprocess.run([sys.executable, "-c", _MAKE_WEIGHTS, str(path)], check=True, timeout=300)
    return path


def tiny_pairs_folder(root: Path, n: int = 3, size: int = 128) -> Path:
    """``n`` random images with rectangle masks in the layout ``training`` reads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(6)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[20 + 10 * i : 70 + 10 * i, 30:90] = 255
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
    return root


def randomize_batchnorms(module: Any, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters, so that
    a wrong fold (or a fold that forgets a term) changes the outputs."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))


def process_gone(pid: int) -> bool:
    """Whether no process has the id ``pid`` any more."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_only_a_resume_state(data: Path, weights: str | Path) -> None:
    """A cancelled fine-tune of ``weights`` on ``data`` left no weights and no stray file:
    at most the complete state that "Resume" goes on from."""
    from napari_lvunet.finetune_events import find_resume

    out = data / "finetuned"
    state = find_resume(data, weights)
    files = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    if state is None:
        assert files == [], files
        return
    assert state.tensors.is_file() and 1 <= state.step < state.total_steps
    assert files == sorted(["resume", state.path.name, state.tensors.name]), files
