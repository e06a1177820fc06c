"""The inference engine: numpy image in, labels out. No napari, no Qt, and on the CPU no
PyTorch: ONNX Runtime runs each model's verified ONNX graph.

One job per module:

* :mod:`.device`: which device (``resolve_device``), asked without torch where possible;
* :mod:`.axes`: which dimension is what (``infer_axes``);
* :mod:`.backends`: the ``Runner`` protocol and the one place that picks a backend and
  its fallback (:mod:`.backends.onnxruntime`, :mod:`.backends.torch`);
* :mod:`.onnx_cache`: verified ONNX graphs, shipped or made once in a child process;
* :mod:`.source`: what is run (checked weights, or a PyTorch model);
* :mod:`.tiling`: resize, tiles and "auto" sizing, in bounded memory;
* :mod:`.postprocess`: activation, threshold, connected components, finite outputs;
* :mod:`.segmenter`: :class:`Segmenter`, the loop;
* :mod:`.pool`: :class:`SegmenterPool`, shared by the widget, the CLI and :func:`segment`.
"""

from ..cancel import Cancelled
from .axes import infer_axes
from .backends import BACKENDS
from .device import bf16_supported, resolve_device
from .pool import SegmenterPool, default_pool, segment
from .postprocess import ModelOutputError
from .segmenter import SegmentationCancelled, Segmenter
from .tiling import SIZINGS

__all__ = [
    "BACKENDS",
    "SIZINGS",
    "Cancelled",
    "ModelOutputError",
    "SegmentationCancelled",
    "Segmenter",
    "SegmenterPool",
    "bf16_supported",
    "default_pool",
    "infer_axes",
    "resolve_device",
    "segment",
    "state_dict_sha256",
]


def state_dict_sha256(model: object) -> str:
    """Hex SHA-256 over a model's state dict: every tensor's name, dtype, shape and bytes.

    The same digest as a weights file's ``tensors_sha256`` for the same tensors.
    """
    from ..weights import tensors_sha256

    return tensors_sha256(model.state_dict())  # type: ignore[attr-defined]
