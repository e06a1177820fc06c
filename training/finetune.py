"""Fine-tune LV-UNet on a folder of (corrected) images: the plugin's retraining loop.

Launch::

    python -m training.finetune --data my_corrections --weights lvunet-kvasir-seg
    python -m training.finetune --data DIR --weights runs/kvasir/best.pt --steps 200 --lr 1e-4
    # what the napari widget runs: machine-readable progress, at most 20 minutes
    python -m training.finetune --data DIR --weights W --progress json --max-minutes 20

Every image of the folder is used (retraining on all corrections, not only the newest,
keeps the model from forgetting the earlier ones), except a small seeded held-out part
on which the Dice is reported before and after; copies of one image are held out or
trained on together. With a ``splits.json`` in the folder its ``train`` split is trained
on and its ``val`` split held out; ``test`` is never touched.

The schedule is a fixed number of optimiser steps (``--steps``, default 100 at 4 of the
user's images a step; ``--epochs`` instead counts passes over the images). Against
forgetting, every batch also holds a share of the shipped Kvasir-SEG replay images
(``--replay``), half of them shown in the colours of the user's images (``--recolour``:
more polyps in the new camera's colours than were corrected), and the pixels where the
start model's proposal differs from the corrected mask weigh more
(``--changed-weight``); the ``camera`` augmentation varies colour balance, gamma and
sharpness as another centre's camera does. Each weight tensor learns at ``--lr`` times
its own RMS (``--lr-scale relative``): a fused network has no BatchNorm left to keep its
layers' scales, which span three orders of magnitude. The levers live in
:mod:`training.adapt`; ``benchmarks/bench_adaptation.py`` measures them.

The start is a training checkpoint (``.pt``, unfused, read with ``weights_only=True``)
when given, else fused weights (a registry name or a ``.safetensors`` file), which are
fine-tuned directly: the fused network has no BatchNorm in its blocks, only
convolutions. A ``.safetensors`` file with a ``.pt`` of the same name beside it (what an
earlier fine-tune wrote) starts from that unfused checkpoint instead, provided it fuses
to exactly the file's weights (the ``tensors_sha256`` of its metadata). From a
checkpoint the BatchNorms keep their running statistics (frozen), since a handful of
images cannot estimate them. The result is written as fused
``.safetensors`` that the plugin's "Load weights from file" opens (plus, from a
checkpoint, an unfused ``.pt`` of the same name to fine-tune again from), under a name
that neither file has yet; nothing existing is ever overwritten. The output folder is
checked before the first step; it is created only when the result or a resume state is
written.

The forgetting check (``--reference``): the start model and the result are scored on the
shipped reference set (32 Kvasir-SEG *test* images, :mod:`training.reference`) at their
original resolution, as the held-out images are; both scores go into the metadata and
the done event.

Progress (``--progress``): ``bar`` (the default on a terminal) shows a progress bar,
``none`` only a line per epoch, and ``json`` writes one ``@lvunet {...}`` event per line
on stdout (start, a step event after every optimiser step, eval, then done, error or
cancelled) and everything else on stderr: see :mod:`napari_lvunet.finetune_events`.

SIGTERM and SIGINT (Ctrl-C) cancel: the run stops within a second, writes no weights,
and exits with code 3. ``--max-minutes`` ends training early at a step boundary and still
writes the result.

Resume (``--resume``): every few steps (``RESUME_EVERY``), on cancel when the loop is
between steps, and at a time-limit stop, the run saves its state in ``OUT/resume/``
(model and optimiser tensors with safetensors, a JSON record of the step, options, data
digest and generator states; never a pickle; see
:mod:`napari_lvunet.finetune_events`). ``--resume`` with the same data, weights, output
folder and options goes on from the saved step; on the CPU the result is bit for bit
that of an uninterrupted run (the sampling and augmentation are pure functions of the
seed and the draw, and every generator's state is restored). It is refused (exit 2)
when the folder's pairs or the options changed. A finished run removes its state.

Exit codes: 0 done, 1 error (bad data, unusable weights, an unwritable output, a
diverged loss, a crash), 2 bad command line or ``--resume`` refused, 3 cancelled.

The napari widget runs this as a child process; :func:`finetune` is the same loop for
Python callers, with ``events``, ``progress`` and ``cancel``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from napari_lvunet.cancel import Cancelled, CancelToken
from napari_lvunet.finetune_events import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    RESUME_EVERY,
    RESUME_FORMAT,
    RESUME_FORMAT_VERSION,
    EventWriter,
    ResumeState,
    data_digest,
    default_out_dir,
    read_resume_state,
    resume_state_path,
    start_sha256,
)
from napari_lvunet.io import atomic_write
from napari_lvunet.model import LVUNet, reparameterize_model
from napari_lvunet.preprocess import normalize

from .adapt import (
    AUGMENTS,
    DEFAULT_AUGMENT,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHANGED_WEIGHT,
    DEFAULT_LR,
    DEFAULT_LR_SCALE,
    DEFAULT_RECOLOUR,
    DEFAULT_REPLAY,
    DEFAULT_STEPS,
    LR_SCALES,
    MixedBatches,
    PairDataset,
    WeightedBCEDiceLoss,
    changed_pixels,
    colour_stats,
    cosine_schedule,
    param_groups,
    parse_fraction,
    parse_share,
    parse_weight,
    replay_count,
    schedule,
)
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
)
from .data import CachedSegmentationDataset, DatasetError, Pair, find_pairs
from .evaluate import evaluate_pairs, summarize
from .options import integer, number
from .outputs import OutputError, check_writable_folder
from .train import TrainingDiverged, autocast_dtype, optimisation_step, select_device

__all__ = [
    "FinetuneCancelled",
    "FinetuneError",
    "FinetuneResumeError",
    "SignalCancel",
    "default_replay",
    "finetune",
    "learnt_from",
    "main",
    "split_heldout",
]

logger = logging.getLogger(__name__)

#: ``progress(epoch, epochs, metrics)`` after each epoch.
Progress = Callable[[int, int, dict[str, float]], None]
#: ``events(name, **fields)`` for each event of :mod:`napari_lvunet.finetune_events`.
Events = Callable[..., Any]


class FinetuneError(ValueError):
    """The start weights or options cannot be used; the message says why."""


class FinetuneResumeError(FinetuneError):
    """``resume`` was refused: no state to go on from, or the data or options changed."""


class FinetuneCancelled(Cancelled):
    """Fine-tuning was cancelled through ``cancel``; no weights were written (the resume
    state may have been)."""


class SignalCancel:
    """The cancel token of the command line: set by SIGTERM / SIGINT.

    The training loop checks it between steps and inside data loading and evaluation,
    but one optimiser step on a CPU can take longer than the promised second, and
    Python runs a signal handler only once the running torch call returns. So the
    signal is also delivered to a watcher thread through :func:`signal.set_wakeup_fd`,
    at once: it sets the token and, if the process still runs ``grace`` seconds later
    and is not writing the result (:meth:`committing`) or the resume state
    (:meth:`saving`), reports the cancellation and ends the process with exit code 3.
    Before the result only the resume state is written, each file atomically and under
    that lock, so there is nothing to clean up.

    Args:
        on_abort: Called by the watcher just before it ends the process (reports the
            cancellation).
        grace: Seconds the loop gets to stop on its own.
    """

    def __init__(self, on_abort: Callable[[], None], grace: float = 0.5) -> None:
        self._event = threading.Event()
        self._commit = threading.Lock()
        self._on_abort = on_abort
        self._grace = grace

    def is_set(self) -> bool:
        return self._event.is_set()

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (call from the main thread)."""
        import socket

        receiver, sender = socket.socketpair()
        sender.setblocking(False)
        self._sockets = (receiver, sender)  # kept open for the life of the process
        signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            # The Python-level handler only replaces the default (die / KeyboardInterrupt).
            signal.signal(signum, lambda signum, frame: self._event.set())
        threading.Thread(
            target=self._watch, args=(receiver,), name="lvunet-cancel", daemon=True
        ).start()

    def _watch(self, receiver: Any) -> None:
        wanted = {int(signal.SIGTERM), int(signal.SIGINT)}
        while True:
            data = receiver.recv(64)
            if not data:
                return
            if wanted & set(data):
                break
        self._event.set()
        time.sleep(self._grace)
        # While the result is being written, let the writer finish: it reports done.
        if self._commit.acquire(blocking=False):
            self._on_abort()
            os._exit(EXIT_CANCELLED)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Hold off the watcher while the resume state is written (even once cancelled:
        the loop stops at its next check, right after)."""
        with self._commit:
            yield

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Hold off the watcher while the result is written; refuse if already cancelled."""
        with self._commit:
            if self.is_set():
                raise FinetuneCancelled("fine-tuning cancelled; nothing was written")
            yield


def split_heldout(
    data_dir: str | Path, pairs: Sequence[Pair], *, fraction: float = 0.2, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into fine-tuning and held-out parts.

    ``splits.json`` (train / val) when the folder has one, else a seeded random
    ``fraction`` (at least one image) is held out. Copies of one image (the same decoded
    pixels under several names) never straddle the split: without splits.json they are
    drawn together, with it a held-out copy of a training image is left out of the
    held-out part (with a warning), since it would only measure memory.

    Raises:
        DatasetError: With fewer than two pairs or two different images, or an empty part.
    """
    from .adapt import content_digest, group_by_content
    from .data import resolve_splits

    if len(pairs) < 2:
        raise DatasetError(
            f"fine-tuning needs at least 2 image/mask pairs in {data_dir} (one is held out "
            f"to measure Dice before and after); found {len(pairs)}"
        )
    if (Path(data_dir) / "splits.json").is_file():
        splits = resolve_splits(data_dir, [p.stem for p in pairs], seed=seed)
        by_stem = {p.stem: p for p in pairs}
        train = [by_stem[s] for s in splits["train"]]
        trained = {content_digest(p.image) for p in train}
        hold, twins = [], []
        for pair in (by_stem[s] for s in splits["val"]):
            (twins if content_digest(pair.image) in trained else hold).append(pair)
        if twins:
            logger.warning(
                "not held out, their images are also in the train split: %s",
                ", ".join(p.stem for p in twins),
            )
        if not hold:
            raise DatasetError(
                f"every val image of {data_dir / 'splits.json'} is a copy of a train image"
            )
        return train, hold
    groups = group_by_content(pairs)
    if len(groups) < 2:
        raise DatasetError(
            f"fine-tuning needs at least 2 different images in {data_dir} (one is held out "
            f"to measure Dice before and after); its {len(pairs)} pairs are one image"
        )
    random.Random(seed).shuffle(groups)
    n_hold = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    hold: list[Pair] = []
    for group in groups[:-1]:  # the last group always trains
        if len(hold) >= n_hold:
            break
        hold.extend(group)
    held = {p.stem for p in hold}
    train = [p for p in pairs if p.stem not in held]
    return sorted(train, key=lambda p: p.stem), sorted(hold, key=lambda p: p.stem)


def _start_from_checkpoint(
    path: Path, ckpt: dict[str, Any], model: LVUNet
) -> tuple[LVUNet, tuple[int, int], dict[str, Any]]:
    if model.act_learn != 1.0:
        raise FinetuneError(
            f"{path} is at act_learn={model.act_learn:.4f}: fine-tune from a checkpoint "
            "of the final act_learn = 1 phase (best.pt), or from fused weights"
        )
    size = ckpt["config"].get("size", (256, 256))
    base = {"checkpoint": path.name, "epoch": int(ckpt["epoch"])}
    return model, (int(size[0]), int(size[1])), base


def _matching_checkpoint(weights: Path) -> tuple[Path, dict[str, Any], LVUNet] | None:
    """The unfused ``.pt`` beside fused weights, if it fuses to exactly those weights."""
    from napari_lvunet.weights import WeightsError, file_tensors, read_metadata, tensors_sha256

    sibling = weights.with_suffix(".pt")
    if weights.suffix != ".safetensors" or not sibling.is_file():
        return None
    try:
        recorded = read_metadata(weights)["tensors_sha256"]
        ckpt = load_checkpoint(sibling)  # weights_only=True
        model = model_from_checkpoint(ckpt)
        fused = reparameterize_model(model)  # ValueError unless act_learn == 1
    except (CheckpointError, WeightsError, ValueError, RuntimeError) as err:
        logger.info("not starting from %s: %s", sibling, err)
        return None
    if tensors_sha256(file_tensors(fused)) != recorded:
        logger.info("not starting from %s: it does not fuse to the weights of %s", sibling, weights)
        return None
    return sibling, ckpt, model


def learnt_from(weights: str | Path) -> str | None:
    """The data set a start model learnt from, as its metadata records it; None if unknown.

    A model trained from scratch names its data set (``dataset.name``); a fine-tune names
    its base, whose data set is known when the base is a registry model. A checkpoint
    (``.pt``), an unreadable file or a chain of fine-tunes is unknown.
    """
    from napari_lvunet.weights import WeightsError, read_metadata, registry

    if str(weights).endswith(".pt"):
        return None
    try:
        if str(weights) in registry():
            return registry()[str(weights)].meta.get("dataset")
        metadata = read_metadata(weights)
    except (WeightsError, OSError):
        return None  # loading the weights says why
    dataset = metadata.get("dataset")
    if "finetune" not in metadata:
        return dataset.get("name") if isinstance(dataset, dict) else None
    base = metadata.get("base_weights")
    name = base.get("name") if isinstance(base, dict) else None
    return registry()[name].meta.get("dataset") if name in registry() else None


def default_replay(weights: str | Path) -> float:
    """The replay share of a fine-tune that does not set ``--replay``.

    The replay images are Kvasir-SEG polyps: they keep a polyp model from forgetting,
    but would teach a skin-lesion or ultrasound model another task. So the share is
    ``DEFAULT_REPLAY`` unless the start model is known to have learnt from another data
    set (:func:`learnt_from`); then 0, with a warning that says how to mix them anyway.
    """
    source = learnt_from(weights)
    if source is None or "kvasir" in str(source).lower():
        return DEFAULT_REPLAY
    logger.warning(
        "fine-tuning without replay: the replay images are Kvasir-SEG polyps and the start "
        "model learnt from %s (pass --replay %g to mix them in anyway)",
        source,
        DEFAULT_REPLAY,
    )
    return 0.0


def _load_start(weights: str | Path) -> tuple[LVUNet, tuple[int, int], dict[str, Any]]:
    if str(weights).endswith(".pt"):
        try:
            ckpt = load_checkpoint(weights)
        except CheckpointError as err:
            raise FinetuneError(str(err)) from err
        return _start_from_checkpoint(Path(weights), ckpt, model_from_checkpoint(ckpt))
    # Fine-tuning the unfused network keeps its BatchNorms and training branches, as
    # training had them; the widget passes the fused file, so look for its .pt here.
    match = _matching_checkpoint(Path(weights))
    if match is not None:
        logger.info("starting from the unfused checkpoint %s (fuses to %s)", match[0], weights)
        return _start_from_checkpoint(*match)
    from napari_lvunet.weights import WeightsError, load_model

    try:
        loaded = load_model(weights)
    except WeightsError as err:
        raise FinetuneError(str(err)) from err
    logger.info("starting from the fused weights %s", loaded.path)
    base = {"name": loaded.name, "sha256": loaded.sha256}
    return loaded.model, loaded.train_size, base


def _free_stem(folder: Path, stem: str, suffixes: Sequence[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3`` ...: the first for which no suffix exists."""
    candidate, n = stem, 2
    while any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
        candidate = f"{stem}-{n}"
        n += 1
    return candidate


def _timestamp() -> str:
    """The local time in result names: sortable, and the same width for every date."""
    return time.strftime("%Y%m%d-%H%M%S")


def _mean_dice(
    model: LVUNet,
    pairs: Sequence[Pair],
    size: tuple[int, int],
    device: torch.device,
    cancel: CancelToken | None,
) -> float | None:
    """Per-image mean Dice of ``model`` on ``pairs`` (None without pairs)."""
    if not pairs:
        return None
    rows = evaluate_pairs({"m": model}, pairs, size, device=device, cancel=cancel)["m"]
    return summarize(rows)["dice"]


def _as_pairs(found: Sequence[Any]) -> list[Pair]:
    return [Pair(p.stem, p.image, p.mask) for p in found]


def _reference_pairs(reference: str | Path | None) -> list[Pair]:
    """The pairs the forgetting check scores: ``shipped`` (the package's reference set),
    a folder with images/ and masks/, or none (``None`` or ``"none"``)."""
    from .reference import reference_pairs

    if reference is None or str(reference) == "none":
        return []
    try:
        if str(reference) == "shipped":
            return _as_pairs(reference_pairs())
        return _as_pairs(reference_pairs(reference))
    except (OSError, ValueError) as err:
        if str(reference) != "shipped":
            raise FinetuneError(f"the reference set {reference} is unusable: {err}") from None
        logger.warning("no reference score: the shipped reference set is unusable (%s)", err)
        return []


def _replay_dataset(
    size: tuple[int, int], augment: Any, seed: int, cancel: CancelToken | None
) -> CachedSegmentationDataset | None:
    """The shipped replay set, cached at ``size``; ``None`` (with a warning) if missing."""
    from .reference import replay_pairs

    try:
        pairs = _as_pairs(replay_pairs())
    except (OSError, ValueError) as err:
        logger.warning("fine-tuning without replay: the replay set is unusable (%s)", err)
        return None
    return CachedSegmentationDataset(pairs, size, augment=augment, seed=seed + 1, cancel=cancel)


def _resume_state(
    state_path: Path | None,
    weights: str | Path,
    data_dir: Path,
    out_dir: Path,
    options: dict[str, Any],
    digest: str,
) -> ResumeState:
    """The resume state a ``--resume`` run goes on from, checked against this run.

    Raises:
        FinetuneResumeError: Without a state for these start weights and output folder,
            or when the data folder's pairs or the options changed since it was saved.
    """
    if state_path is None:
        raise FinetuneResumeError(f"cannot resume: the start weights {weights} cannot be read")
    try:
        state = read_resume_state(state_path)
    except FileNotFoundError:
        raise FinetuneResumeError(
            f"nothing to resume: no interrupted fine-tune from {weights} in {out_dir}"
        ) from None
    except (OSError, ValueError) as err:
        raise FinetuneResumeError(f"cannot resume: {err}") from None
    if state.data_digest != digest:
        raise FinetuneResumeError(
            f"cannot resume: the pairs in {data_dir} changed since step {state.step} was "
            "saved (images or masks added, removed or edited); start a new fine-tune"
        )
    changed = sorted(
        k for k in {*options, *state.options} if options.get(k) != state.options.get(k)
    )
    if changed:
        was = ", ".join(f"{k} {state.options.get(k)!r} (now {options.get(k)!r})" for k in changed)
        raise FinetuneResumeError(
            f"cannot resume: the options differ from the interrupted run's: {was}; give "
            "the same options, or start a new fine-tune"
        )
    return state


def _save_state(
    path: Path,
    record: dict[str, Any],
    model: LVUNet,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    batches: MixedBatches,
) -> None:
    """Write a resume state: the tensors file first, then the JSON record naming it, each
    atomically; earlier tensors files of this state are removed once the record is in
    place (so a record always names a complete file)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    extra: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().clone()
            else:
                extra.setdefault(str(index), {})[key] = value
    streams, generators = batches.state()
    for i, gen in enumerate(generators):
        tensors[f"rng.stream.{i}"] = gen
    tensors["rng.torch"] = torch.get_rng_state()
    payload = save(tensors)
    record = {
        **record,
        "optimizer": {"param_groups": opt["param_groups"], "state": extra},
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "streams": streams,
        "tensors": f"{path.stem}-step{record['step']}.safetensors",
        "tensors_sha256": hashlib.sha256(payload).hexdigest(),
    }
    text = json.dumps(record, indent=1, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors_path = path.parent / record["tensors"]
    atomic_write(tensors_path, lambda f: f.write(payload), overwrite=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=True)
    for old in path.parent.glob(f"{path.stem}-step*.safetensors"):
        if old != tensors_path:
            old.unlink(missing_ok=True)


def _restore(
    state: ResumeState,
    model: LVUNet,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    batches: MixedBatches,
    device: torch.device,
) -> dict[str, Any]:
    """Load a resume state into the run (tensors with safetensors, never unpickled).

    Returns:
        ``step``, ``epochs_done``, ``loss_sum``, ``dice_sum``, ``seen`` and ``trained_s``.

    Raises:
        FinetuneResumeError: If the files do not match each other or this model.
    """
    from safetensors.torch import load

    record = state.record
    payload = state.tensors.read_bytes()
    if hashlib.sha256(payload).hexdigest() != record["tensors_sha256"]:
        raise FinetuneResumeError(f"cannot resume: {state.tensors} is damaged (sha256 differs)")
    try:
        tensors = load(payload)
        model.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        saved = record["optimizer"]
        groups = [
            {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]
        ]
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = value
        for index, values in saved["state"].items():
            per_param.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
        scheduler.load_state_dict(record["scheduler"])
        if scaler.is_enabled() and record["scaler"]:
            scaler.load_state_dict(record["scaler"])
        n = len(record["streams"])
        batches.load_state(record["streams"], [tensors[f"rng.stream.{i}"] for i in range(n)])
        torch.set_rng_state(tensors["rng.torch"])
        sums = record["sums"]
        progress = {
            "step": state.step,
            "epochs_done": int(record["epochs_done"]),
            "loss_sum": float(sums["loss"]),
            "dice_sum": float(sums["dice"]),
            "seen": int(sums["seen"]),
            "trained_s": float(record["trained_s"]),
        }
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise FinetuneResumeError(
            f"cannot resume from {state.path}: it does not fit this run ({first})"
        ) from None
    model.to(device)
    return progress


def _drop_state(path: Path) -> None:
    """Remove a resume state (record first, so that a half-removed one is never read)."""
    path.unlink(missing_ok=True)
    for old in path.parent.glob(f"{path.stem}-step*.safetensors"):
        old.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty


def _check_options(
    steps: int | None,
    epochs: int | None,
    lr: float,
    lr_scale: str,
    batch_size: int,
    max_minutes: float | None,
    replay: float,
    recolour: float,
    changed_weight: float,
    augment: str,
) -> None:
    if steps is not None and epochs is not None:
        raise FinetuneError("give steps or epochs, not both")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise FinetuneError("steps and epochs must be at least 1")
    if batch_size < 1:
        raise FinetuneError("batch_size must be at least 1")
    if not (math.isfinite(replay) and 0 <= replay < 1):
        raise FinetuneError(f"replay must be a share in [0, 1), got {replay}")
    if not (math.isfinite(recolour) and 0 <= recolour <= 1):
        raise FinetuneError(f"recolour must be a share in [0, 1], got {recolour}")
    if not (math.isfinite(changed_weight) and changed_weight >= 1):
        raise FinetuneError(f"changed_weight must be at least 1, got {changed_weight}")
    if augment not in AUGMENTS:
        raise FinetuneError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise FinetuneError(f"lr must be a positive finite number, got {lr}")
    if lr_scale not in LR_SCALES:
        raise FinetuneError(f"lr_scale must be one of {', '.join(LR_SCALES)}, got {lr_scale!r}")
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise FinetuneError(f"max_minutes must be a positive number, got {max_minutes}")


def finetune(
    data_dir: str | Path,
    weights: str | Path,
    out_dir: str | Path | None = None,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    lr: float = DEFAULT_LR,
    lr_scale: str = DEFAULT_LR_SCALE,
    progress: Progress | None = None,
    events: Events | None = None,
    cancel: CancelToken | None = None,
    max_minutes: float | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    heldout_fraction: float = 0.2,
    replay: float | None = None,
    recolour: float = DEFAULT_RECOLOUR,
    changed_weight: float = DEFAULT_CHANGED_WEIGHT,
    augment: str = DEFAULT_AUGMENT,
    device: str = "auto",
    precision: str = "auto",
    resume: bool = False,
    reference: str | Path | None = "shipped",
) -> Path:
    """Fine-tune weights on a folder and write fused weights (see the module docstring).

    Args:
        data_dir: Folder with ``images/`` and ``masks/`` (stems matched; png/jpg/tif,
            any sizes).
        weights: Registry name, fused ``.safetensors`` file, or training checkpoint ``.pt``.
        out_dir: Where to write (created when the result is written); default
            ``<data_dir>/finetuned``. Checked for writing before anything is trained.
        steps: Optimiser steps (the default schedule: ``DEFAULT_STEPS`` of
            :mod:`training.adapt` when neither this nor ``epochs`` is given); the
            held-out Dice is measured before and after.
        epochs: Passes over the fine-tuning images instead of ``steps``; the held-out
            Dice is measured after every epoch.
        lr: Adam learning rate, decayed along a cosine to 1 % of it; with ``lr_scale``
            ``relative`` (the default) per unit of each weight tensor's RMS.
        lr_scale: ``relative`` (each tensor learns at ``lr`` times its RMS, see
            :func:`training.adapt.param_groups`) or ``absolute`` (one rate for all).
        progress: Called as ``progress(epoch, epochs, metrics)`` with ``loss``,
            ``train_dice`` and ``heldout_dice``: after each epoch with ``epochs``, once at
            the end with ``steps``.
        events: Called as ``events(name, **fields)`` with the ``start``, ``step`` (after
            every optimiser step) and ``eval`` events of :mod:`napari_lvunet.finetune_events`; the
            ending (done, error, cancelled) is the caller's to report.
        cancel: An object with ``is_set()`` (a ``threading.Event``), checked before every
            step, before each image is read and each held-out evaluation: when set,
            fine-tuning stops and :class:`FinetuneCancelled` is raised.
        max_minutes: Stop training after this many minutes, at a step boundary, and
            write what was reached (recorded in the metadata).
        seed: Seed of the held-out split, the augmentation and the sampling.
        batch_size: The user's images per step (fewer when the folder is smaller);
            replay images come on top.
        heldout_fraction: Share of images held out (at least one) without splits.json.
        replay: Share of every batch taken from the shipped replay set (Kvasir-SEG train
            images, :func:`training.reference.replay_pairs`), against forgetting; 0 = off.
        recolour: Share of the replay images shown in the colours of the user's
            training images (:func:`training.adapt.recolour`): more polyps in the new
            camera's colours than the user corrected; 0 = off.
        changed_weight: Weight, in the cross-entropy, of the pixels where the start
            model's proposal differs from the mask (1 = all pixels alike).
        augment: ``camera`` (colour, gamma and blur as another camera differs) or
            ``mild`` (see :data:`training.adapt.AUGMENTS`).
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast (see training.train).
        resume: Go on from the resume state that an interrupted run with the same start
            weights, output folder, data and options saved (see
            :mod:`napari_lvunet.finetune_events`); on CPU the result is the same, bit
            for bit, as that of an uninterrupted run.
        reference: The forgetting check, scored before and after (in the metadata):
            ``"shipped"`` (the package's reference set, Kvasir-SEG test images), a
            folder with ``images/`` and ``masks/``, or ``None`` / ``"none"``.

    Returns:
        The path of the fused ``.safetensors`` weights written.

    Raises:
        DatasetError: For an unusable folder (nothing is written).
        FinetuneError: For unusable start weights or options, an output folder that
            cannot be written, or a loss that became NaN or infinite (nothing is
            written).
        FinetuneResumeError: When ``resume`` is refused (nothing is trained).
        FinetuneCancelled: When ``cancel`` was set (no weights are written; after at
            least one step the resume state is).
    """
    try:
        return _finetune(
            data_dir,
            weights,
            out_dir,
            steps=steps,
            epochs=epochs,
            lr=lr,
            lr_scale=lr_scale,
            progress=progress,
            events=events,
            cancel=cancel,
            max_minutes=max_minutes,
            seed=seed,
            batch_size=batch_size,
            heldout_fraction=heldout_fraction,
            replay=default_replay(weights) if replay is None else replay,
            recolour=recolour,
            changed_weight=changed_weight,
            augment=augment,
            device=device,
            precision=precision,
            resume=resume,
            reference=reference,
        )
    except FinetuneCancelled:
        raise
    except Cancelled as err:  # from data loading or evaluation
        raise FinetuneCancelled(f"fine-tuning {err}; nothing was written") from None


def _finetune(
    data_dir: str | Path,
    weights: str | Path,
    out_dir: str | Path | None,
    *,
    steps: int | None,
    epochs: int | None,
    lr: float,
    lr_scale: str,
    progress: Progress | None,
    events: Events | None,
    cancel: CancelToken | None,
    max_minutes: float | None,
    seed: int,
    batch_size: int,
    heldout_fraction: float,
    replay: float,
    recolour: float,
    changed_weight: float,
    augment: str,
    device: str,
    precision: str,
    resume: bool,
    reference: str | Path | None,
) -> Path:
    _check_options(
        steps,
        epochs,
        lr,
        lr_scale,
        batch_size,
        max_minutes,
        replay,
        recolour,
        changed_weight,
        augment,
    )
    per_epoch_eval = epochs is not None
    if not per_epoch_eval and steps is None:
        steps = DEFAULT_STEPS
    emit = events or (lambda name, **fields: None)

    def cancelled(where: str) -> None:
        if cancel is not None and cancel.is_set():
            raise FinetuneCancelled(f"fine-tuning cancelled {where}; nothing was written")

    data_dir = Path(data_dir)
    pairs = find_pairs(data_dir)
    train_pairs, hold = split_heldout(data_dir, pairs, fraction=heldout_fraction, seed=seed)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(data_dir)
    try:  # before any work: a result that cannot be saved is not worth computing
        check_writable_folder(out_dir)
    except OutputError as err:
        raise FinetuneError(f"{err}; choose another output folder (--out)") from None
    per_batch = min(batch_size, len(train_pairs))
    steps_per_epoch = math.ceil(len(train_pairs) / per_batch)
    total_steps, epochs = schedule(len(train_pairs), per_batch, steps=steps, epochs=epochs)
    options = {
        "steps": steps,
        "epochs": epochs if per_epoch_eval else None,
        "total_steps": total_steps,
        "lr": lr,
        "lr_scale": lr_scale,
        "batch_size": batch_size,
        "replay": replay,
        "recolour": recolour,
        "changed_weight": changed_weight,
        "augment": augment,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
    }
    digest = data_digest(data_dir)
    try:
        start_sha = start_sha256(weights)
    except OSError:
        start_sha = None  # unreadable: loading the weights below says why
    state_path = None if start_sha is None else resume_state_path(out_dir, start_sha)
    state = None
    if resume:
        state = _resume_state(state_path, weights, data_dir, out_dir, options, digest)
    emit(
        "start",
        pairs=len(pairs),
        train_pairs=len(train_pairs),
        heldout_pairs=len(hold),
        total_steps=total_steps,
        epochs=epochs,
        **({"resume_step": state.step} if state is not None else {}),
    )
    cancelled("before starting")
    model, size, base = _load_start(weights)
    dev = select_device(device)
    dtype = autocast_dtype(precision, dev)
    aug = AUGMENTS[augment]
    train_ds = CachedSegmentationDataset(train_pairs, size, augment=aug, seed=seed, cancel=cancel)
    replay_ds = _replay_dataset(size, aug, seed, cancel) if replay > 0 else None
    n_replay = replay_count(per_batch, replay) if replay_ds is not None else 0
    reference_set = _reference_pairs(reference)

    model = model.to(dev)
    changed = None
    if changed_weight > 1:
        # The start model's proposal against the correction: what the user changed.
        changed = changed_pixels(
            model, train_ds.images, train_ds.masks, size, device=dev, cancel=cancel
        )
    if state is not None:  # the start model's scores were measured by the first run
        before = state.record["before"]["heldout"]
        reference_before = state.record["before"]["reference"]
    else:
        before = _mean_dice(model, hold, size, dev, cancel)
        reference_before = _mean_dice(model, reference_set, size, dev, cancel)
    emit("eval", epoch=0, heldout_dice=before, reference_dice=reference_before)
    logger.info(
        "fine-tuning on %d images (+%d replay images per step), %d held out (Dice before: %s)",
        len(train_ds),
        n_replay,
        len(hold),
        "n/a" if before is None else f"{before:.4f}",
    )
    batches = MixedBatches(
        PairDataset(train_ds, changed),
        PairDataset(
            replay_ds,
            None,
            colours=colour_stats(train_ds.images) if recolour else None,
            recolour_share=recolour,
        )
        if n_replay
        else None,
        user_per_batch=per_batch,
        replay_per_batch=n_replay,
        seed=seed,
    )
    criterion = WeightedBCEDiceLoss(changed_weight)
    optimizer = torch.optim.Adam(param_groups(model, lr, lr_scale), weight_decay=1e-4)
    scheduler = cosine_schedule(optimizer, total_steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    after = before
    step = 0
    epochs_done = 0
    loss_sum = dice_sum = 0.0
    seen = 0
    trained_s = 0.0  # training time of earlier runs of a resumed fine-tune
    if state is not None:
        progress_state = _restore(state, model, optimizer, scheduler, scaler, batches, dev)
        step, epochs_done = progress_state["step"], progress_state["epochs_done"]
        loss_sum, dice_sum = progress_state["loss_sum"], progress_state["dice_sum"]
        seen, trained_s = progress_state["seen"], progress_state["trained_s"]
        logger.info("resuming at step %d of %d from %s", step, total_steps, state.path)
    first_step = step
    t0 = time.monotonic()
    deadline = None if max_minutes is None else t0 + 60.0 * max_minutes
    stopped_early = False

    def save_state() -> Path | None:
        """Write the resume state after ``step`` (None where it cannot be written)."""
        if state_path is None or not 0 < step < total_steps:
            return None
        record = {
            "format": RESUME_FORMAT,
            "format_version": RESUME_FORMAT_VERSION,
            "step": step,
            "total_steps": total_steps,
            "epochs_done": epochs_done,
            "weights": str(weights),
            "start_sha256": start_sha,
            "data_folder": str(data_dir.resolve()),
            "data_digest": digest,
            "options": options,
            "before": {"heldout": before, "reference": reference_before},
            "sums": {"loss": loss_sum, "dice": dice_sum, "seen": seen},
            "trained_s": trained_s + time.monotonic() - t0,
        }
        saving = cancel.saving() if isinstance(cancel, SignalCancel) else contextlib.nullcontext()
        try:
            with saving:
                _save_state(state_path, record, model, optimizer, scheduler, scaler, batches)
        except OSError as err:  # resuming is a convenience: training goes on
            logger.warning("could not save the resume state in %s: %s", state_path.parent, err)
            return None
        return state_path

    def to_train_mode() -> None:
        model.train()
        # A few images cannot estimate BatchNorm statistics: keep the trained ones.
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    def close_epoch(epoch: int) -> None:
        nonlocal after, epochs_done, loss_sum, dice_sum, seen
        cancelled(f"after epoch {epoch}")
        after = _mean_dice(model, hold, size, dev, cancel)
        epochs_done = epoch
        emit("eval", epoch=epoch, heldout_dice=after)
        metrics = {
            "loss": loss_sum / seen,
            "train_dice": dice_sum / seen,
            "heldout_dice": math.nan if after is None else after,
        }
        logger.info(
            "epoch %d/%d loss %.4f train Dice %.4f held-out Dice %.4f",
            epoch,
            epochs,
            *metrics.values(),
        )
        if progress is not None:
            progress(epoch, epochs, metrics)
        loss_sum = dice_sum = 0.0
        seen = 0
        to_train_mode()

    to_train_mode()
    epoch = max(1, math.ceil(step / steps_per_epoch))
    try:
        if per_epoch_eval and step and step % steps_per_epoch == 0 and epochs_done < epoch:
            close_epoch(epoch)  # the run stopped while it measured this epoch
        for index in range(first_step, total_steps):
            epoch = index // steps_per_epoch + 1
            cancelled(f"in epoch {epoch}")
            if step > first_step and deadline is not None and time.monotonic() >= deadline:
                stopped_early = True  # at least one step, so that there is a result
                break
            x, y, pixels_changed = batches.batch()
            criterion.set_changed(pixels_changed.to(dev))
            x, y = normalize(x.to(dev)), y.to(dev)
            try:
                loss, dice = optimisation_step(
                    model,
                    x,
                    y,
                    criterion=criterion,
                    optimizer=optimizer,
                    scaler=scaler,
                    dtype=dtype,
                )
            except TrainingDiverged as err:
                raise FinetuneError(f"{err}: lower --lr") from None
            scheduler.step()
            step += 1
            loss_sum += loss * len(x)
            dice_sum += float(dice.sum())
            seen += len(x)
            elapsed = time.monotonic() - t0
            eta = elapsed / (step - first_step) * (total_steps - step)
            if deadline is not None:
                eta = min(eta, max(0.0, deadline - time.monotonic()))
            emit(
                "step",
                step=step,
                total_steps=total_steps,
                epoch=epoch,
                epochs=epochs,
                loss=loss,
                elapsed_s=round(elapsed, 3),
                eta_s=round(eta, 3),
            )
            if step % RESUME_EVERY == 0:
                save_state()
            if per_epoch_eval and step % steps_per_epoch == 0:
                close_epoch(epoch)
    except Cancelled as err:  # FinetuneCancelled, or Cancelled from an evaluation
        if step > first_step and save_state() is not None:
            raise FinetuneCancelled(
                f"fine-tuning cancelled after step {step} of {total_steps}; no weights were "
                f"written, and --resume goes on from step {step}"
            ) from err
        raise FinetuneCancelled(f"fine-tuning {err}; nothing was written") from err
    resume_step = None
    if stopped_early and save_state() is not None:
        resume_step = step
    if seen:  # the last epoch (steps) or the one the time limit cut short
        close_epoch(epoch)
    reference_after = _mean_dice(model, reference_set, size, dev, cancel)
    if stopped_early:
        logger.warning(
            "stopped after %d of %d steps: the time limit of %g minutes was reached%s",
            step,
            total_steps,
            max_minutes,
            "" if resume_step is None else f" (--resume goes on from step {step})",
        )
    model = model.cpu().float().eval()
    stem = f"lvunet-finetuned-{data_dir.resolve().name}-{_timestamp()}"
    metadata = {
        "train_size": list(size),
        "dataset": {
            "name": data_dir.resolve().name,
            "finetune_images": [p.stem for p in train_pairs],
            "heldout_images": [p.stem for p in hold],
        },
        "base_weights": base,
        "finetune": {
            "schedule": "epochs" if per_epoch_eval else "steps",
            "epochs": epochs,
            "lr": lr,
            "lr_scale": lr_scale,
            "seed": seed,
            "batch_size": per_batch,
            "replay": {"share": replay, "per_batch": n_replay, "recolour": recolour},
            "changed_weight": changed_weight,
            "augment": augment,
            "steps": step,
            "total_steps": total_steps,
            **({"stopped_at_time_limit_minutes": max_minutes} if stopped_early else {}),
            **({"resumed_from_step": first_step} if state is not None else {}),
            **({"resume_step": resume_step} if resume_step is not None else {}),
        },
        "metrics": {
            "heldout_before": {"dice": before},
            "heldout_after": {"dice": after},
            "reference_before": {"dice": reference_before},
            "reference_after": {"dice": reference_after},
            "note": "per-image mean Dice on the held-out images and on the shipped reference "
            "set (Kvasir-SEG test images), original resolution",
        },
    }
    commit = cancel.committing() if isinstance(cancel, SignalCancel) else contextlib.nullcontext()
    with commit:
        cancelled("before writing")
        path = _write_result(model, out_dir, stem, metadata, size, data_dir, epochs_done, after)
    if resume_step is None and state_path is not None:
        _drop_state(state_path)  # finished: nothing left to resume
    logger.info(
        "held-out Dice %s -> %s; fused weights written to %s",
        before,
        after,
        path,
    )
    return path


def _write_result(
    model: LVUNet,
    out_dir: Path,
    stem: str,
    metadata: dict[str, Any],
    size: tuple[int, int],
    data_dir: Path,
    epochs_done: int,
    after: float | None,
) -> Path:
    from napari_lvunet.weights import save_weights

    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # One name free for both files, so that the .pt beside the weights is their own.
        stem = _free_stem(out_dir, stem, (".safetensors", ".pt"))
        path = out_dir / f"{stem}.safetensors"
        save_weights(model, path, metadata)
        if not model.fused:
            ckpt_path = path.with_suffix(".pt")
            payload = {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "model_config": model.config,
                "epoch": epochs_done,
                "act_learn": 1.0,
                "metrics": {"heldout_dice": after},
                "config": {
                    "size": list(size),
                    "data": data_dir.resolve().name,
                    "finetune": metadata,
                },
            }
            try:
                atomic_write(ckpt_path, lambda f: torch.save(payload, f), overwrite=False)
            except BaseException:
                path.unlink(missing_ok=True)  # the pair is written as a unit
                raise
            logger.info("unfused checkpoint (to fine-tune again from): %s", ckpt_path)
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise FinetuneError(
            f"cannot write the result to {out_dir}: {err.strerror or err}"
        ) from None
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.finetune",
        description=(
            "Fine-tune LV-UNet on a folder with images/ and masks/ (stems matched; png/jpg/tif) "
            "and write fused .safetensors weights for the plugin's 'Load weights from file'. "
            "A small held-out part reports Dice before and after."
        ),
        epilog=(
            "Exit codes: 0 done, 1 error, 2 bad command line or --resume refused, 3 "
            "cancelled (SIGTERM or SIGINT; no weights are written, only the resume "
            "state). With --progress json every event is one line "
            "'@lvunet {json}' on stdout (start, step, eval, done / error / cancelled) and "
            "all other output goes to stderr."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder with images/ and masks/")
    p.add_argument(
        "--weights",
        required=True,
        metavar="NAME_OR_FILE",
        help="registry name, fused .safetensors, or training checkpoint .pt (preferred)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default DATA/finetuned)")
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=integer(1),
        help=f"optimiser steps (default {DEFAULT_STEPS}); held-out Dice before and after",
    )
    length.add_argument(
        "--epochs",
        type=integer(1),
        help="passes over the images instead of --steps; held-out Dice after every epoch",
    )
    p.add_argument(
        "--lr",
        type=number(positive=True),
        default=DEFAULT_LR,
        help=f"Adam learning rate (default {DEFAULT_LR:g}); with --lr-scale relative, per "
        "unit of each weight tensor's RMS",
    )
    p.add_argument(
        "--lr-scale",
        choices=LR_SCALES,
        default=DEFAULT_LR_SCALE,
        help="relative (default): each weight tensor learns at --lr times its RMS, so "
        "that every layer of the fused network moves by the same share of itself; "
        "absolute: one learning rate for all",
    )
    p.add_argument(
        "--batch-size",
        type=integer(1),
        default=DEFAULT_BATCH_SIZE,
        help=f"your images per step (default {DEFAULT_BATCH_SIZE}); replay images come on top",
    )
    p.add_argument(
        "--replay",
        type=parse_share,
        default=None,
        metavar="SHARE",
        help="share of every batch taken from the shipped Kvasir-SEG replay images, "
        f"against forgetting (default {DEFAULT_REPLAY:g}, or 0 for a start model that "
        "learnt from another data set; 0 = off)",
    )
    p.add_argument(
        "--recolour",
        type=parse_fraction,
        default=DEFAULT_RECOLOUR,
        metavar="SHARE",
        help="share of the replay images shown in the colours of your images, so that "
        f"the model sees more polyps in your camera's colours (default {DEFAULT_RECOLOUR:g}; "
        "0 = off)",
    )
    p.add_argument(
        "--changed-weight",
        type=parse_weight,
        default=DEFAULT_CHANGED_WEIGHT,
        metavar="W",
        help="weight of the pixels where the start model's proposal differs from your "
        f"mask (default {DEFAULT_CHANGED_WEIGHT:g}; 1 = all pixels alike)",
    )
    p.add_argument(
        "--augment",
        choices=tuple(AUGMENTS),
        default=DEFAULT_AUGMENT,
        help=f"augmentation (default {DEFAULT_AUGMENT}: colour, gamma and blur as another "
        "camera differs; mild: the earlier, milder one)",
    )
    p.add_argument("--seed", type=integer(0), default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument(
        "--max-minutes",
        type=number(positive=True),
        metavar="M",
        help="stop training after M minutes (at a step boundary) and write the result",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from where an interrupted fine-tune (cancelled, stopped at its time "
        "limit, crashed) with the same --data, --weights, --out and options stopped; "
        "refused (exit 2) when the pairs or options changed",
    )
    p.add_argument(
        "--reference",
        default="shipped",
        metavar="SET",
        help="the forgetting check scored before and after: 'shipped' (default: the "
        "package's Kvasir-SEG test images), a folder with images/ and masks/, or 'none'",
    )
    p.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        help="bar: a progress bar (default on a terminal); json: one '@lvunet {...}' event "
        "per line on stdout, everything else on stderr; none: one line per epoch",
    )
    return p


def _json_stdout() -> TextIO:
    """The real stdout, for event lines only; fd 1 and ``sys.stdout`` now go to stderr.

    Redirecting the file descriptor too keeps stray output of libraries (C code
    included) out of the event stream.
    """
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", buffering=1, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    mode = args.progress or ("bar" if sys.stderr.isatty() else "none")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    writer: EventWriter | None = None
    out = sys.stdout
    if mode == "json":
        writer = EventWriter(_json_stdout())
        out = sys.stderr

    def say(message: str) -> None:
        print(message, file=out, flush=True)

    def report_cancelled() -> None:
        if writer is not None:
            writer("cancelled")
        else:
            print("cancelled; nothing was written", file=sys.stderr, flush=True)

    cancel = SignalCancel(report_cancelled)
    if threading.current_thread() is threading.main_thread():
        cancel.install()
    bar = None

    def on_event(name: str, **fields: Any) -> None:
        nonlocal bar
        if writer is not None:
            writer(name, **fields)
        elif mode == "bar" and name == "start":
            from tqdm.auto import tqdm

            bar = tqdm(total=fields["total_steps"], desc="fine-tuning", unit="step")
        elif bar is not None and name == "step":
            bar.set_postfix(epoch=f"{fields['epoch']}/{fields['epochs']}", loss=fields["loss"])
            bar.update()

    def report(epoch: int, total: int, m: dict[str, float]) -> None:
        if writer is None:
            line = (
                f"epoch {epoch}/{total}  loss {m['loss']:.4f}  train Dice {m['train_dice']:.4f}  "
                f"held-out Dice {m['heldout_dice']:.4f}"
            )
            (bar.write if bar is not None else say)(line)

    def fail(message: str) -> int:
        if writer is not None:
            writer("error", message=message)
        else:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_ERROR

    try:
        path = finetune(
            args.data,
            args.weights,
            args.out,
            steps=args.steps,
            epochs=args.epochs,
            lr=args.lr,
            lr_scale=args.lr_scale,
            progress=report,
            events=on_event,
            cancel=cancel,
            max_minutes=args.max_minutes,
            seed=args.seed,
            batch_size=args.batch_size,
            replay=args.replay,
            recolour=args.recolour,
            changed_weight=args.changed_weight,
            augment=args.augment,
            device=args.device,
            precision=args.precision,
            resume=args.resume,
            reference=args.reference,
        )
    except FinetuneCancelled as err:
        if writer is None:
            say(str(err))
        report_cancelled()
        return EXIT_CANCELLED
    except FinetuneResumeError as err:
        fail(str(err))
        return EXIT_USAGE
    except (DatasetError, FinetuneError, CheckpointError) as err:
        return fail(str(err))
    except (MemoryError, torch.OutOfMemoryError):
        return fail("out of memory while fine-tuning: lower --batch-size, or free memory and retry")
    except Exception as err:  # a crash: the traceback for a bug report, then one line
        traceback.print_exc(file=sys.stderr)
        first = (str(err).strip().splitlines() or [""])[0]
        return fail(f"fine-tuning failed: {type(err).__name__}: {first}")
    finally:
        if bar is not None:
            bar.close()
    from napari_lvunet.weights import read_metadata

    meta = read_metadata(path)
    m, run = meta["metrics"], meta["finetune"]
    before, after = m["heldout_before"]["dice"], m["heldout_after"]["dice"]
    ref_before, ref_after = m["reference_before"]["dice"], m["reference_after"]["dice"]
    if writer is not None:
        writer(
            "done",
            weights=str(path.resolve()),
            heldout_dice_before=before,
            heldout_dice_after=after,
            reference_dice_before=ref_before,
            reference_dice_after=ref_after,
            steps=run["steps"],
            total_steps=run["total_steps"],
            resume_step=run.get("resume_step"),
        )
    if before is not None and after is not None:
        say(f"held-out Dice: {before:.4f} before, {after:.4f} after")
    if ref_before is not None and ref_after is not None:
        say(f"reference Dice: {ref_before:.4f} before, {ref_after:.4f} after")
    say(f"fused weights written to {path}")
    if path.with_suffix(".pt").is_file():
        say(f"unfused checkpoint (to fine-tune again from): {path.with_suffix('.pt')}")
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    if code == EXIT_CANCELLED:
        # Interpreter teardown (freeing torch's memory and thread pools) can take
        # seconds on a busy machine; a cancelled run has nothing left to save, and the
        # promise is to be gone within a second.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
