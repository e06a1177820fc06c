"""The widget's "Retrain" section: fine-tune the chosen model on the saved corrections.

Fine-tuning runs in a child process (``python -m training.finetune --progress json``,
through :class:`napari_lvunet._finetune_job.FinetuneJob`), so napari never imports torch
and survives a crash or an out-of-memory kill of the training. Its events reach the GUI
thread through Qt signals; the new weights are then added to the model picker.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, LineEdit, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal

from ._annotations import finetune_command
from ._finetune_job import FinetuneJob, FinetuneResult, FinetuneStep, finetune_argv
from ._qt_util import if_alive
from ._torch import TRAIN_INSTALL, torch_installed

if TYPE_CHECKING:
    from ._widget import LVUNetWidget

__all__ = ["RetrainSection"]

logger = logging.getLogger(__name__)


class _JobSignals(QObject):
    """Carries a fine-tune child's events from its reader thread to the GUI thread."""

    step = Signal(object)  # FinetuneStep
    done = Signal(object)  # FinetuneResult
    failed = Signal(str)
    cancelled = Signal()


class RetrainSection(Container):
    """Training steps, the Fine-tune button and the command to run it outside napari.

    Args:
        main: The dock widget this section belongs to (model picker, dataset folder,
            progress, status and Messages field).
    """

    def __init__(self, main: LVUNetWidget) -> None:
        super().__init__(labels=True)
        self._main = main
        self.job: FinetuneJob | None = None  # the fine-tune child process, if running
        self._signals = _JobSignals()
        self._signals.step.connect(self._on_step)
        self._signals.done.connect(self._on_done)
        self._signals.failed.connect(self._on_failed)
        self._signals.cancelled.connect(self._on_cancelled)

        self.command = LineEdit(label="Fine-tune command", value="")
        self.command.native.setReadOnly(True)
        self.steps = SpinBox(label="Training steps", min=1, max=100_000, value=100)
        self.finetune_button = PushButton(text="Fine-tune")
        self.command.tooltip = "The command that fine-tunes outside napari; select and copy it."
        self.steps.tooltip = (
            "How long fine-tuning trains: each step learns from 4 of your corrections and "
            "1 shipped image. 100 steps adapt the model to a new centre's images in about "
            "6 minutes on a 2-core laptop CPU."
        )
        self.finetune_button.tooltip = (
            "Retrain the chosen model on the saved corrections, in the background; the new "
            "weights are then chosen."
        )
        self.extend([self.command, self.steps, self.finetune_button])
        self.finetune_button.changed.connect(self.finetune)

    def _alive(self) -> bool:
        return self._main._alive()

    def model_choices(self) -> list[tuple[str, str]]:
        """Extra model-picker entries of this section (``(label, key)``)."""
        return []

    def update_command(self, _value: Any = None) -> None:
        """Show the shell command that fine-tunes the chosen model on the dataset folder."""
        main = self._main
        folder = main.data_dir.value
        if folder and str(folder) not in ("", "."):
            self.command.value = finetune_command(folder, main.model.value or "")

    def finetune(self) -> None:
        """Fine-tune the current model on the dataset folder in a child process (the button).

        The child is ``python -m training.finetune ... --progress json``; napari's process
        never imports torch, and a crash or out-of-memory kill of the child ends as a
        notification. On success the new weights are added to the model picker and chosen.
        """
        main = self._main
        if main.busy:
            show_warning("LV-UNet is busy: wait for the running job, or press Cancel.")
            return
        folder = main.data_dir.value
        if not folder or str(folder) in ("", ".") or not Path(folder).is_dir():
            show_error("Choose an existing dataset folder (saved with 'Save for training').")
            return
        if main.model.value is None:
            show_error("No model selected to fine-tune.")
            return
        if not torch_installed() or importlib.util.find_spec("training") is None:
            # The install line goes where it can be read whole and copied, not in a toast.
            self.command.value = TRAIN_INSTALL
            main._show_details(
                "Fine-tuning needs PyTorch and the training package, which are not "
                f"installed in this Python. Install them with:\n{TRAIN_INSTALL}\n"
                "then restart napari."
            )
            main.status.value = "fine-tuning needs PyTorch"
            show_error(
                "Fine-tuning needs PyTorch: copy the install command from the "
                "'Fine-tune command' field."
            )
            return
        signals = self._signals
        job = FinetuneJob(
            finetune_argv(folder, main.model.value, steps=int(self.steps.value)),
            on_progress=signals.step.emit,
            on_done=signals.done.emit,
            on_error=signals.failed.emit,
            on_cancelled=signals.cancelled.emit,
        )
        try:
            job.start()
        except OSError as err:
            show_error(f"LV-UNet: fine-tuning could not start: {err}")
            return
        self.job = job
        main.progress.max, main.progress.value = 1, 0
        main.status.value = f"fine-tuning on {Path(folder).name}: starting..."
        main._show_details(f"Fine-tuning (process {job.pid}):\n{' '.join(job.argv)}")
        main.segment_button.enabled = self.finetune_button.enabled = False
        main.cancel_button.enabled = True

    def cancel(self) -> None:
        """Stop a running fine-tune: SIGTERM; the child stops within a second or is killed."""
        if self.job is not None:
            self.job.cancel()

    @if_alive
    def _on_step(self, step: FinetuneStep) -> None:
        main = self._main
        main.progress.max = max(step.total_steps, 1)
        main.progress.value = min(step.step, main.progress.max)
        main.status.value = f"fine-tuning: {step.describe()}"

    def _job_ended(self) -> None:
        self.job = None
        self._main.segment_button.enabled = self.finetune_button.enabled = True
        self._main.cancel_button.enabled = False

    @if_alive
    def _on_done(self, result: FinetuneResult) -> None:
        main = self._main
        self._job_ended()
        main.progress.value = main.progress.max
        main.add_weights_file(result.weights)
        dice = ""
        if result.heldout_dice_before is not None and result.heldout_dice_after is not None:
            dice = (
                f" (held-out Dice {result.heldout_dice_before:.3f} -> "
                f"{result.heldout_dice_after:.3f})"
            )
        main.status.value = f"fine-tuned: {result.weights.name}{dice}"
        main._show_details(f"Fine-tuned weights{dice}:\n{result.weights}")
        show_info(f"LV-UNet: fine-tuned weights{dice} saved and selected.")

    @if_alive
    def _on_failed(self, message: str) -> None:
        main = self._main
        self._job_ended()
        main.status.value = "fine-tuning failed"
        logger.error("LV-UNet fine-tuning failed: %s", message)
        main._show_details(message)
        first_line = message.split("\n", 1)[0]
        more = " (details in the widget's Messages field)" if "\n" in message else ""
        show_error(f"LV-UNet: {first_line}{more}")

    @if_alive
    def _on_cancelled(self) -> None:
        main = self._main
        self._job_ended()
        main.status.value = "cancelled"
        main._show_details("Fine-tuning cancelled; nothing was written.")
        show_info("LV-UNet: fine-tuning cancelled; nothing was written.")
