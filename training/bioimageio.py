"""Package a model for bioimage.io: ONNX weights, test tensors, cover, model card, citations.

Launch (from the repository root)::

    python -m training.bioimageio --weights lvunet-kvasir-seg --out lvunet-kvasir-seg.zip
    python -m training.bioimageio --weights runs/x/model.safetensors --out x.zip

The zip follows the bioimage.io model description format 0.5 (``rdf.yaml`` at its root),
so deepImageJ, ilastik, QuPath, bioimageio.core and napari's bioimage.io tools can run the
model:

* weights: the engine's verified ONNX graph (the one napari-lvunet runs on the CPU; the
  ImageNet normalisation is inside it);
* input ``image``: ``(batch, channel = R, G, B, y, x)`` uint8, ``y`` and ``x`` multiples of
  128; preprocessing: to float32, times 1/255 (what the plugin does with uint8 images);
* output ``probability``: ``(batch, channel = polyp, y, x)``, the sigmoid of the graph's
  logits, the size of the input;
* test tensors: the plugin's sample polyp image resized to the training size, and the
  model's output on it; a cover image (the image beside its probability map);
* documentation: the model card (``docs/MODEL_CARD.md`` for the bundled model, else a
  short card built from the weights' metadata); licence MIT; citations: LV-UNet and
  Kvasir-SEG.

The plugin itself resizes whole frames to the training size (``sizing="resize"``);
bioimage.io tools run the graph on the image as given (any multiple of 128): resize large
frames to about the training size first for the same results.

Validate a package offline with ``bioimageio.spec`` (and ``bioimageio.core`` to run its
test): ``tests/test_bioimageio.py`` does both.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from napari_lvunet.io import atomic_write

__all__ = ["build_package", "main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = ROOT / "docs" / "MODEL_CARD.md"
FORMAT_VERSION = "0.5.4"
CITATIONS = [
    {
        "text": "Jiang J, Wang M, Tian H, Cheng L, Liu Y. LV-UNet: A Lightweight and Vanilla "
        "Model for Medical Image Segmentation. IEEE BIBM 2024, 4240-4246.",
        "url": "https://arxiv.org/abs/2408.16886",
    },
    {
        "text": "Jha D, Smedsrud PH, Riegler MA, Halvorsen P, de Lange T, Johansen D, "
        "Johansen HD. Kvasir-SEG: A Segmented Polyp Dataset. MultiMedia Modeling "
        "(MMM 2020), 451-462.",
        "url": "https://arxiv.org/abs/1911.07069",
    },
]


_VALIDATION = """

## Validation (this package)

The test tensors are the plugin's sample polyp image (Kvasir-SEG test split) resized to
the training size, and this ONNX graph's output on it; napari-lvunet's tests check that
the package validates with ``bioimageio.spec`` and that this output equals the plugin's
own inference engine's. Accuracy figures are in the model card above.
"""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _test_image(size: tuple[int, int]) -> np.ndarray:
    """The sample polyp image, resized (bilinear) to ``size``: ``(H, W, 3)`` uint8."""
    from PIL import Image

    from napari_lvunet._sample_data import polyp

    image = polyp()[0][0]
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))


def _card(info: Any) -> str:
    """The model card: the bundled one, or a short one from the weights' metadata."""
    from napari_lvunet.weights import DEFAULT_MODEL

    if info.name == DEFAULT_MODEL and MODEL_CARD.is_file():
        return MODEL_CARD.read_text()
    meta = info.metadata
    lines = [
        f"# {info.name}",
        "",
        "LV-UNet (Jiang et al., IEEE BIBM 2024) weights exported from napari-lvunet.",
        "",
        f"- weights file sha256: `{info.sha256}`",
        f"- training size (height, width): {list(info.train_size)}",
    ]
    for key in ("dataset", "split", "metrics", "epochs"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    lines += ["", "For research and annotation assistance, not for diagnosis.", ""]
    return "\n".join(lines)


def build_package(weights: str) -> dict[str, bytes]:
    """The files of a bioimage.io package for ``weights`` (a registry name or file).

    Returns:
        ``{file name: bytes}``, ``rdf.yaml`` included.

    Raises:
        napari_lvunet.weights.WeightsError: For weights that fail their checks.
        ValueError: For a model that is not a one-class (polyp) model, or a graph whose
            input is not RGB in [0, 1].
    """
    import onnx
    import onnxruntime
    import yaml

    from napari_lvunet.inference.onnx_cache import graph_for
    from napari_lvunet.inference.source import ModelSource

    source = ModelSource.from_any(weights)
    info = source.info
    if info is None:  # pragma: no cover - from_any on a name or path always has one
        raise ValueError(f"{weights}: not a weights file")
    if source.num_classes != 1:
        raise ValueError(f"{info.name}: {source.num_classes} classes; only binary models")
    graph_path = graph_for(source)
    graph = graph_path.read_bytes()
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    if session.get_modelmeta().custom_metadata_map.get("input") != "unit_rgb":
        raise ValueError(f"{graph_path}: the graph does not take RGB in [0, 1]")
    opset = max(
        op.version
        for op in onnx.load_from_string(graph).opset_import
        if op.domain in ("", "ai.onnx")
    )

    size = info.train_size
    image = _test_image(size)
    test_input = np.ascontiguousarray(image.transpose(2, 0, 1)[None])  # (1, 3, H, W) uint8
    (logits,) = session.run(None, {session.get_inputs()[0].name: test_input / np.float32(255)})
    test_output = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    cover = np.concatenate(
        [image, np.repeat((test_output[0, 0] * 255 + 0.5).astype(np.uint8)[..., None], 3, -1)],
        axis=1,
    )

    files = {
        "lvunet.onnx": graph,
        "test_input.npy": _npy(test_input),
        "test_output.npy": _npy(test_output),
        "cover.png": _png(cover),
        "README.md": (_card(info) + _VALIDATION).encode(),
    }
    space = {"min": 128, "step": 128}
    rdf = {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": f"LV-UNet polyp segmentation ({info.name})",
        "description": "Lightweight polyp segmentation in colonoscopy frames (LV-UNet, fused "
        "deployment form, 0.5 M parameters), trained with napari-lvunet. For research and "
        "annotation assistance, not for diagnosis.",
        "version": str(info.metadata.get("code_version", "0.1.0")),
        "authors": [{"name": "napari-lvunet developers"}],
        "cite": CITATIONS,
        "license": "MIT",
        "tags": ["segmentation", "polyp", "colonoscopy", "endoscopy", "2d", "onnx", "lv-unet"],
        "documentation": "README.md",
        "covers": ["cover.png"],
        "inputs": [
            {
                "id": "image",
                "description": "RGB colonoscopy frame, uint8",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["red", "green", "blue"]},
                    {"type": "space", "id": "y", "size": space},
                    {"type": "space", "id": "x", "size": space},
                ],
                "test_tensor": {"source": "test_input.npy", "sha256": None},
                "data": {"type": "uint8"},
                "preprocessing": [
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    {"id": "scale_linear", "kwargs": {"gain": 1.0 / 255.0, "offset": 0.0}},
                ],
            }
        ],
        "outputs": [
            {
                "id": "probability",
                "description": "polyp probability",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["polyp"]},
                    {"type": "space", "id": "y", "size": {"tensor_id": "image", "axis_id": "y"}},
                    {"type": "space", "id": "x", "size": {"tensor_id": "image", "axis_id": "x"}},
                ],
                "test_tensor": {"source": "test_output.npy", "sha256": None},
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "sigmoid"}],
            }
        ],
        "weights": {
            "onnx": {
                "source": "lvunet.onnx",
                "sha256": _sha256(graph),
                "opset_version": int(opset),
                "authors": [{"name": "napari-lvunet developers"}],
            }
        },
        "training_data": None,
        "config": {
            "napari_lvunet": {
                "weights_sha256": info.sha256,
                "tensors_sha256": info.tensors_sha256,
                "train_size": list(size),
                "plugin_sizing": "resize whole frames to train_size",
            }
        },
    }
    del rdf["training_data"]
    rdf["inputs"][0]["test_tensor"]["sha256"] = _sha256(files["test_input.npy"])
    rdf["outputs"][0]["test_tensor"]["sha256"] = _sha256(files["test_output.npy"])
    files["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True).encode()
    return files


def write_package(files: dict[str, bytes], out: Path, *, overwrite: bool = False) -> Path:
    """Zip ``files`` into ``out`` (atomically; never over an existing file unless asked)."""

    def write(file: Any) -> None:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in ["rdf.yaml", *sorted(n for n in files if n != "rdf.yaml")]:
                archive.writestr(name, files[name])

    return atomic_write(out, write, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.bioimageio",
        description="Write a bioimage.io model package (zip) for LV-UNet weights.",
    )
    parser.add_argument(
        "--weights", required=True, metavar="NAME_OR_FILE", help="registry name or .safetensors"
    )
    parser.add_argument("--out", required=True, type=Path, help="the .zip to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    from napari_lvunet.weights import WeightsError

    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        files = build_package(args.weights)
        write_package(files, args.out, overwrite=args.overwrite)
    except (WeightsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
