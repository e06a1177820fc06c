"""ONNX Runtime on the CPU: the default, and no PyTorch in the process."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..onnx_cache import graph_for

NAME = "onnxruntime"
# The graph's input and output names (napari_lvunet.export writes them; that module
# imports torch, so the names are repeated here and a test holds them equal).
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def unsupported(device: str, bf16: bool, source: Any) -> str | None:
    if device != "cpu":
        return (
            f"the onnxruntime backend runs on the CPU, not {device}: "
            "use device='cpu' or backend='torch'"
        )
    if not source.fusible:
        return (
            "the onnxruntime backend runs the fused model, and this model cannot be fused "
            "(act_learn is not 1): use backend='torch'"
        )
    if bf16:
        return "bf16 runs on the torch backend: use backend='torch'"
    return None


def create(source: Any, device: str, bf16: bool, num_threads: int | None, cache_dir: Any) -> Any:
    if importlib.util.find_spec("onnxruntime") is None:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install onnxruntime")
    return OrtRunner(graph_for(source, cache_dir), num_threads)


class OrtRunner:
    """Runs a verified ONNX graph (normalisation inside) with ONNX Runtime on the CPU."""

    backend = NAME
    device = "cpu"

    def __init__(self, path: Path, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ONNX Runtime threads otherwise spin on the cores for a while after every
        # run, and starve whatever runs next: another session, napari's drawing.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
