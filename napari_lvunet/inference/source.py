"""What a segmenter runs: checked weights, a PyTorch model, or both."""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..weights import WeightsFile, open_weights, registry, tensors_sha256

__all__ = ["ModelSource"]

logger = logging.getLogger(__name__)


def _is_lvunet(obj: Any) -> bool:
    # Without torch in the process nothing can be an LVUNet; never import it to ask.
    if "torch" not in sys.modules:
        return False
    from ..model import LVUNet

    return isinstance(obj, LVUNet)


@dataclass
class ModelSource:
    """One model as the engine sees it.

    Attributes:
        key: SHA-256 of the fused float32 tensors (a weights file's ``tensors_sha256``):
            what ONNX graphs are cached by and segmenters are pooled by.
        num_classes: Output classes.
        metadata: The weights' metadata (empty for a bare model).
        info: The checked weights file, when the model came from one.
        fusible: The model runs fused (always, for weights files).
    """

    key: str
    num_classes: int
    metadata: dict[str, Any]
    info: WeightsFile | None = None
    fusible: bool = True
    _model: Any = field(default=None, repr=False)

    @classmethod
    def from_any(cls, model: Any, *, progressbar: bool | Any = False) -> ModelSource:
        """A source from a registry name, a weights path, a ``WeightsFile``, loaded weights
        (``napari_lvunet.weights.LoadedModel``) or an ``LVUNet``.

        Raises:
            TypeError: For anything else.
            napari_lvunet.weights.WeightsError: For a name or file that fails its checks.
        """
        if isinstance(model, (str, os.PathLike)):
            model = open_weights(model, progressbar=progressbar)
        if isinstance(model, WeightsFile):
            arch = model.metadata["architecture"]
            return cls(model.tensors_sha256, int(arch["num_classes"]), dict(model.metadata), model)
        inner = getattr(model, "model", None)
        if _is_lvunet(inner):  # loaded weights: the torch model and where it came from
            source = cls._from_lvunet(inner)
            source.metadata = dict(getattr(model, "metadata", None) or {})
            path = getattr(model, "path", None)
            if path is not None:
                sha = str(getattr(model, "sha256", ""))
                entry = next((e for e in registry().values() if e.sha256 == sha), None)
                graph = None
                if entry is not None and entry.onnx_filename:
                    from ..weights import fetch_graph

                    graph = fetch_graph(entry.name, progressbar=False)
                source.info = WeightsFile(
                    name=str(getattr(model, "name", Path(path).stem)),
                    path=Path(path),
                    sha256=sha,
                    metadata=source.metadata,
                    onnx_path=graph,
                    onnx_sha256=entry.onnx_sha256 if graph is not None and entry else None,
                )
            return source
        if _is_lvunet(model):
            return cls._from_lvunet(model)
        raise TypeError(
            "expected a model name, a .safetensors path, checked weights, loaded weights "
            f"(with .model) or an LVUNet; got {type(model).__name__}"
        )

    @classmethod
    def _from_lvunet(cls, model: Any) -> ModelSource:
        from ..export import fused_cpu_copy
        from ..weights import file_tensors

        fusible = bool(model.fused or model.act_learn == 1.0)
        if fusible:
            runnable = fused_cpu_copy(model)
            key = tensors_sha256(file_tensors(runnable))
        else:
            # Still deep training (act_learn < 1): only PyTorch can run it as it is. A copy,
            # so that the caller's model keeps its device and train/eval mode.
            logger.info(
                "model is unfused at act_learn=%s: running it with PyTorch", model.act_learn
            )
            runnable = copy.deepcopy(model).float().eval()
            key = tensors_sha256(runnable.state_dict())
        return cls(key, int(model.num_classes), {}, None, fusible, runnable)

    @property
    def name(self) -> str:
        return self.info.name if self.info is not None else "model"

    def torch_model(self) -> Any:
        """The PyTorch model (fused where possible, CPU, eval), loaded on first use."""
        if self._model is None:
            from ..weights import load_model

            assert self.info is not None
            self._model = load_model(self.info.path, progressbar=False).model
        return self._model

    @property
    def has_torch_model(self) -> bool:
        return self._model is not None
