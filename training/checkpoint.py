"""Training checkpoints: atomic writes, safe loading, the model they hold.

A checkpoint is a plain dict of tensors and built-in types, saved with ``torch.save``
and read back only with ``torch.load(..., weights_only=True)``, which refuses to
unpickle arbitrary objects. It holds the unfused model (for resuming and fine-tuning),
the optimiser / scheduler / scaler / RNG states, the resolved config, the epoch and the
metrics; ``training.export`` turns it into fused safetensors for the plugin.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from napari_lvunet.io import atomic_write
from napari_lvunet.model import LVUNet

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_save",
    "atomic_write_text",
    "load_checkpoint",
    "model_from_checkpoint",
]

CHECKPOINT_FORMAT = "napari-lvunet.train-checkpoint.v1"
_REQUIRED = ("format", "model", "model_config", "epoch", "config")


class CheckpointError(ValueError):
    """A file is not a usable training checkpoint; the message says why."""


def atomic_save(obj: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file + rename)."""
    return atomic_write(path, lambda f: torch.save(dict(obj), f), overwrite=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``) onto the CPU.

    Raises:
        CheckpointError: If the file is missing, unreadable, or not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run whatever code
        # the file carries: never repeat that advice for a file of unknown origin.
        raise CheckpointError(
            f"refusing {path}: it holds pickled Python objects besides tensors, which are "
            "never loaded (a file from another program, or a malicious one)"
        ) from None
    except Exception as err:  # corrupt or truncated
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a napari-lvunet training checkpoint")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> LVUNet:
    """Rebuild the (unfused) model of a checkpoint, in eval mode on the CPU."""
    cfg = dict(ckpt["model_config"])
    model = LVUNet(int(cfg["num_classes"]), act_num=int(cfg["act_num"]), fused=bool(cfg["fused"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
