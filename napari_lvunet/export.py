"""Export a fused LV-UNet to ONNX: the one export function of the project.

The inference engine calls :func:`export_onnx` to build (and cache) the model ONNX
Runtime runs on CPUs, and ``python -m training.export --onnx`` calls it to ship one.

The graph comes from torch's TorchScript (tracing) ONNX exporter: deprecated since torch
2.9 but several times faster on this network (2-3 s against 17-22 s for the
``torch.export``-based one, measured on a busy 2-core CPU), a wait the first Segment in
napari and every fine-tuned model pay.
Where that exporter is missing or its graph fails the check against PyTorch, the
``torch.export``-based exporter (torch's default) builds it instead. Batch, height and
width are dynamic; only multiples of :data:`~napari_lvunet.model.SIZE_DIVISOR` are valid
(LV-UNet downsamples seven times and joins its skips by addition; the engine pads), which
the torch.export path declares as ``128 * k``. ``LVUNet.forward`` skips its own size
check while either exporter traces it (``torch.jit.is_tracing()`` or
``torch.compiler.is_compiling()`` is true then), so the check does not pin the sizes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import atomic_write
from .model import LVUNet, reparameterize_model
from .preprocess import SIZE_DIVISOR, normalize

__all__ = [
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "disagreement",
    "export_onnx",
    "fused_cpu_copy",
    "main",
]

logger = logging.getLogger(__name__)

#: Name of the graph's input, ``(batch, 3, height, width)`` float32, ImageNet-normalised.
INPUT_NAME = "image"
#: Name of the graph's output, ``(batch, num_classes, height, width)`` logits.
OUTPUT_NAME = "logits"
#: Oldest opset accepted (the project's requirement for deployed graphs).
MIN_OPSET = 17

# Largest height/width the graph declares: 128 * 512 = 65536 px, beyond any image napari
# holds in one piece. The bound only constrains the symbolic shapes, it costs nothing.
_MAX_SIZE_MULTIPLE = 512
# The export check (see disagreement): graph and PyTorch may differ by this fraction of the
# logits' scale; float32 kernels that sum in another order (AVX2 against AVX-512, oneDNN
# against MLAS) differ by about 1e-6 of it, a wrong graph by far more than 1e-3.
_RELATIVE_TOLERANCE = 1e-4
# Example input for tracing: batch 2 and 256 px, because torch.export specialises any
# dimension that is 1 somewhere in the graph (a 128 px input is 1 px at the bottleneck).
_EXAMPLE_SHAPE = (2, 3, 2 * SIZE_DIVISOR, 2 * SIZE_DIVISOR)


def fused_cpu_copy(model: LVUNet) -> LVUNet:
    """A fused float32 copy of ``model`` on the CPU in eval mode; ``model`` is untouched.

    Args:
        model: A fused LV-UNet, or an unfused one at ``act_learn == 1``.

    Returns:
        The deployment form, ready to trace or to run.

    Raises:
        TypeError: If ``model`` is not an :class:`~napari_lvunet.model.LVUNet`.
        ValueError: If ``model`` is unfused with ``act_learn != 1`` (fusing would change
            its outputs).
    """
    if not isinstance(model, LVUNet):
        raise TypeError(f"expected an LVUNet, got {type(model).__name__}")
    # reparameterize_model deep-copies; a fused model is copied here so that moving it to
    # the CPU and float32 never touches the caller's (maybe GPU, maybe training) model.
    fused = copy.deepcopy(model) if model.fused else reparameterize_model(model)
    return fused.to(device="cpu", dtype=torch.float32).eval()


class _WithNormalization(nn.Module):
    """The network behind the shared ImageNet normalisation, as one graph."""

    def __init__(self, model: LVUNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x))


def export_onnx(
    model: LVUNet,
    path: str | os.PathLike[str],
    *,
    opset: int = 18,
    metadata: Mapping[str, str] | None = None,
    verify: bool = True,
    include_normalization: bool = False,
) -> Path:
    """Export the fused form of ``model`` to an ONNX file.

    The graph takes ``image``: ``(batch, 3, height, width)`` float32, ImageNet-normalised
    (:func:`napari_lvunet.preprocess.normalize`) or, with ``include_normalization``, RGB
    in [0, 1] that the graph normalises itself; height and width multiples of 128, all
    three dynamic. It returns ``logits``: ``(batch, num_classes, height, width)``. The
    weights are stored inside the one file (no external-data side file). The file is
    written to a temporary name and moved into place, so a reader never sees half a file
    and an existing file is only replaced by a complete, verified one.

    Args:
        model: A fused LV-UNet, or an unfused one at ``act_learn == 1`` (fused here, on a
            copy; ``model`` is untouched).
        path: Destination ``.onnx`` file; its folder must exist.
        opset: ONNX opset version, at least :data:`MIN_OPSET`.
        metadata: Extra string key/values stored in the ONNX model's ``metadata_props``
            (e.g. the weights' metadata JSON). ``num_classes`` and ``size_divisor`` are
            always stored.
        verify: Run the exported graph in ONNX Runtime on a random batch of a size it was
            not traced at and compare it with PyTorch (atol 1e-4) before writing it; a
            TorchScript graph that disagrees is rebuilt by the torch.export-based
            exporter, one from that exporter that disagrees raises.
        include_normalization: Trace :func:`~napari_lvunet.preprocess.normalize` into
            the graph (the inference engine's form: ONNX Runtime then needs no PyTorch op
            per image). The metadata key ``input`` records which form a file holds:
            ``"normalized"`` or ``"unit_rgb"``.

    Returns:
        The path written.

    Raises:
        TypeError: If ``model`` is not an LV-UNet.
        ValueError: If ``opset`` is too old, ``model`` cannot be fused (``act_learn !=
            1``), the folder does not exist, or the exported graph disagrees with PyTorch.
        RuntimeError: If both exporters fail (message from torch included).
    """
    path = Path(path)
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    if not path.parent.is_dir():
        raise ValueError(f"cannot export to {path}: folder {path.parent} does not exist")
    fused = fused_cpu_copy(model)
    graph: nn.Module = _WithNormalization(fused).eval() if include_normalization else fused
    props = {
        "num_classes": str(fused.num_classes),
        "size_divisor": str(SIZE_DIVISOR),
        "input": "unit_rgb" if include_normalization else "normalized",
    }
    props.update(metadata or {})

    example = torch.randn(_EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    logger.info("exporting LV-UNet to ONNX (opset %d): %s", opset, path)
    start = time.perf_counter()
    try:
        data = _with_props(_export_torchscript(graph, example, opset), props)
        if verify:  # before anything is written: a bad graph never replaces a good file
            _verify(graph, data)
        exporter = "TorchScript"
    except Exception as err:  # the legacy exporter may be gone, or trace a wrong graph
        logger.info(
            "the TorchScript ONNX exporter failed (%s); using the torch.export-based one", err
        )
        data = _with_props(_export_dynamo(graph, example, opset), props)
        if verify:
            _verify(graph, data)
        exporter = "torch.export-based"
    logger.info(
        "exported with the %s ONNX exporter in %.1f s", exporter, time.perf_counter() - start
    )
    return atomic_write(path, lambda file: file.write(data), overwrite=True)


def _export_torchscript(graph: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """Serialized graph from the TorchScript (tracing) exporter: the fast one."""
    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    # Deprecated since torch 2.9 but still shipped, and several times faster than the
    # torch.export-based exporter on this network. Its deprecation notices are silenced,
    # and the tracer's note on normalize()'s input check (ndim and channel count, fixed
    # in the graph anyway); any other tracer warning still shows, and _verify checks the
    # graph at sizes it was not traced at.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", message=r"The feature will be removed", category=DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", category=torch.jit.TracerWarning, module=r"napari_lvunet\.preprocess"
        )
        with _stdout_to_log():
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                opset_version=opset,
                dynamo=False,
                verbose=False,
            )
    return buffer.getvalue()


def _export_dynamo(graph: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    """Serialized graph from the ``torch.export``-based exporter: slow, but maintained."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    k_h = torch.export.Dim("k_height", min=1, max=_MAX_SIZE_MULTIPLE)
    k_w = torch.export.Dim("k_width", min=1, max=_MAX_SIZE_MULTIPLE)
    try:
        with _stdout_to_log():
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch, 2: SIZE_DIVISOR * k_h, 3: SIZE_DIVISOR * k_w}},
                opset_version=opset,
                dynamo=True,
                verbose=False,
                optimize=True,
            )
    except Exception as err:  # the exporter raises many private error types
        raise RuntimeError(f"ONNX export failed with torch {torch.__version__}: {err}") from err
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    # The exporters report progress on stdout even with verbose=False in some versions;
    # a library must not print, so that chatter is captured into the log.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            yield
    finally:
        if chatter.getvalue():
            logger.debug("torch.onnx.export: %s", chatter.getvalue().strip())


def _with_props(onnx_bytes: bytes, props: Mapping[str, str]) -> bytes:
    """The graph with ``props`` added to (or replacing keys of) its ``metadata_props``."""
    import onnx

    proto = onnx.load_model_from_string(onnx_bytes)
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update(props)
    onnx.helper.set_model_props(proto, merged)
    return proto.SerializeToString()


def _verify(graph: nn.Module, onnx_bytes: bytes) -> None:
    """Compare the exported graph with PyTorch on a random batch of an unseen size."""
    import onnxruntime as ort

    # Not the tracing example's size (batch 2, 256 x 256): proves that batch, height and
    # width are really dynamic, down to 1 px at the bottleneck. A private generator: the
    # check must not draw from (and shift) the caller's global random stream.
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, SIZE_DIVISOR, 3 * SIZE_DIVISOR, generator=generator)
    with torch.inference_mode():
        expected = graph(x).numpy()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    problem = disagreement(expected, got)
    if problem is not None:
        raise ValueError(
            f"the exported ONNX graph disagrees with PyTorch: {problem}; "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}"
        )


def disagreement(reference: np.ndarray, candidate: np.ndarray) -> str | None:
    """Why ``candidate`` logits do not stand in for ``reference`` ones, or ``None``.

    The rule of every export check (the engine's graph against PyTorch, fused against
    unfused weights): both finite; the largest difference at most 1e-4 of the logits'
    scale (their largest magnitude, at least 1), so that it holds on every CPU whatever
    order its kernels sum in; and the same label (sign, or argmax for several classes) at
    every pixel the reference decides by more than that tolerance.

    Args:
        reference: Logits ``(N, C, H, W)`` from the trusted form.
        candidate: Logits of the same shape from the form under test.

    Returns:
        ``None`` when they agree, else one line saying how they differ.
    """
    if candidate.shape != reference.shape:
        return f"output shape {candidate.shape}, expected {reference.shape}"
    for what, logits in (("reference", reference), ("exported", candidate)):
        if not np.isfinite(logits).all():
            return f"the {what} logits contain NaN or infinite values"
    scale = max(1.0, float(np.abs(reference).max()))
    tolerance = _RELATIVE_TOLERANCE * scale
    difference = float(np.abs(candidate - reference).max())
    if difference > tolerance:
        return (
            f"max |logit difference| {difference:.3g} exceeds {tolerance:.3g} "
            f"({_RELATIVE_TOLERANCE:g} of the logits' scale {scale:.3g})"
        )
    if reference.shape[1] == 1:
        decided = np.abs(reference) > tolerance
        flipped = decided & ((reference > 0) != (candidate > 0))
    else:
        top2 = np.sort(reference, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
        flipped = decided & (reference.argmax(axis=1) != candidate.argmax(axis=1))
    if flipped.any():
        return f"{int(flipped.sum())} clearly decided pixels change label"
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m napari_lvunet.export WEIGHTS OUT.onnx``: the engine's export worker.

    The inference engine runs this in a child process when a user's own weights have no
    ONNX graph yet, so that the napari process never imports PyTorch. It loads and checks
    the weights, exports the graph with normalisation inside, verifies it against PyTorch
    (:func:`disagreement`) and writes it atomically. Exit 0 on success; 1 with one line on
    stderr otherwise.
    """
    import argparse

    from .weights import WeightsError, load_model

    parser = argparse.ArgumentParser(prog="python -m napari_lvunet.export")
    parser.add_argument("weights", help="fused weights (.safetensors) or a registry name")
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.weights, progressbar=False)
        export_onnx(
            loaded.model,
            args.out,
            include_normalization=True,
            metadata={"tensors_sha256": str(loaded.metadata["tensors_sha256"])},
        )
    except (WeightsError, ValueError, RuntimeError, OSError) as err:
        print(f"napari-lvunet export: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
