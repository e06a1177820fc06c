"""PyTorch: CUDA and Apple MPS, bf16, and models still in their unfused training form."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ..._torch import import_torch
from . import DeviceOutOfMemory

NAME = "torch"


def unsupported(device: str, bf16: bool, source: Any) -> str | None:
    return None


def create(source: Any, device: str, bf16: bool, num_threads: int | None, cache_dir: Any) -> Any:
    import_torch(f"the torch backend on {device}", gui_safe=True)
    return TorchRunner(source.torch_model(), device, bf16)


class TorchRunner:
    """Runs the model with PyTorch: inference mode, channels_last, optional bf16."""

    backend = NAME

    def __init__(self, model: Any, device: str, bf16: bool) -> None:
        self.torch = import_torch("the torch backend", gui_safe=True)
        self.device = device
        self.bf16 = bf16
        self.model = model.to(device).to(memory_format=self.torch.channels_last).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from ...preprocess import normalize

        torch = self.torch
        x = normalize(torch.from_numpy(batch)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        # Autocast only when asked: not every torch build has it for every device type.
        precision = (
            torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode(), precision:
                return self.model(x).float().cpu().numpy()
        except torch.OutOfMemoryError as err:
            if self.device == "cpu":
                raise
            self.model.to("cpu")
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"the GPU ({self.device}) ran out of memory") from err
