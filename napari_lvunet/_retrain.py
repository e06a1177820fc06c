"""The widget's "Retrain" section: fine-tune, compare, keep or go back, resume.

Fine-tuning runs in a child process (``python -m training.finetune --progress json``,
through :class:`napari_lvunet._finetune_job.FinetuneJob`), so napari never imports torch
and survives a crash or an out-of-memory kill of the training. Its events reach the GUI
thread through Qt signals.

What a clinician sees:

* The model picker lists every model version of the user models folder
  (:mod:`napari_lvunet.versions`: the bundled model, then each fine-tune with its date
  and held-out Dice), in every napari session, and starts on the current version.
  Choosing a version there is going back (or forward): it becomes the current one, so
  the next session starts on it too. "Delete version" removes the chosen one (after
  asking; never the bundled model, never the one a running fine-tune started from).
* When a fine-tune ends, its weights are registered as a new version and a
  before/after panel shows the held-out Dice (the user's own held-out pairs) and the
  reference Dice (the shipped Kvasir-SEG test images, the forgetting check) of the
  current model and of the new one, with a warning when the reference Dice drops by
  more than :data:`REFERENCE_DROP_WARNING`. "Use the new model" selects it; "Keep the
  current model" leaves the picker as it was (the new version stays listed).
* "Resume (step k of N)" appears when an interrupted fine-tune of the chosen model on
  the chosen folder left a resume state whose pairs are unchanged.
"""

from __future__ import annotations

import html
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, LineEdit, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, QTimer, Signal

from . import versions
from ._annotations import finetune_command
from ._finetune_job import FinetuneJob, FinetuneResult, FinetuneStep, finetune_argv
from ._qt_util import WrappedText, if_alive
from ._torch import TRAIN_INSTALL, torch_installed
from .finetune_events import ResumeState, find_resume, start_sha256

if TYPE_CHECKING:
    from ._widget import LVUNetWidget

__all__ = ["REFERENCE_DROP_WARNING", "BeforeAfter", "RetrainSection"]

logger = logging.getLogger(__name__)

#: A reference-set Dice drop larger than this is shown as a warning (forgetting).
REFERENCE_DROP_WARNING = 0.02
_WARN_STYLE = "color: #e8a33d; font-weight: bold;"
# The options of a resume state and the command-line flags that give them again.
_RESUME_FLAGS = (
    ("steps", "--steps"),
    ("epochs", "--epochs"),
    ("lr", "--lr"),
    ("lr_scale", "--lr-scale"),
    ("batch_size", "--batch-size"),
    ("replay", "--replay"),
    ("recolour", "--recolour"),
    ("changed_weight", "--changed-weight"),
    ("augment", "--augment"),
    ("seed", "--seed"),
)


class _JobSignals(QObject):
    """Carries a fine-tune child's events from its reader thread to the GUI thread."""

    step = Signal(object)  # FinetuneStep
    done = Signal(object)  # FinetuneResult
    failed = Signal(str)
    cancelled = Signal()


@dataclass(frozen=True)
class BeforeAfter:
    """A fine-tune's outcome as the panel shows it: the current model against the new one.

    Attributes:
        version: The new version (registered).
        current: What the current model is called.
        heldout: Held-out Dice ``(current, new)``; ``None`` where not measured.
        reference: Reference-set Dice ``(current, new)``.
    """

    version: versions.Version
    current: str
    heldout: tuple[float | None, float | None]
    reference: tuple[float | None, float | None]

    @property
    def reference_drop(self) -> float | None:
        """How much the reference Dice fell (negative: it rose); ``None`` if unknown."""
        before, after = self.reference
        return None if before is None or after is None else before - after

    @property
    def forgetting(self) -> bool:
        """Whether the reference Dice dropped by more than :data:`REFERENCE_DROP_WARNING`."""
        drop = self.reference_drop
        return drop is not None and drop > REFERENCE_DROP_WARNING


def _comparison(before: float | None, after: float | None) -> str:
    if before is None and after is None:
        return "not measured"
    if before is None or after is None:
        return f"current {_dice(before)}, new {_dice(after)}"
    return f"current {before:.3f} \u2192 new {after:.3f} ({after - before:+.3f})"


def _dice(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(outcome: BeforeAfter) -> str:
    """The panel's text: the two models, then a table of both Dice, current against new."""
    cell = ' style="padding: 1px 4px;" align="right"'
    rows = [f"<tr><td></td><td{cell}>current</td><td{cell}>new</td><td{cell}>change</td></tr>"]
    for what, (before, after), warn in (
        ("Held-out Dice", outcome.heldout, False),
        ("Reference Dice", outcome.reference, outcome.forgetting),
    ):
        change = "" if before is None or after is None else f"{after - before:+.3f}"
        if warn:
            change = f'<span style="{_WARN_STYLE}">{change}</span>'
        rows.append(
            f"<tr><td>{what}</td><td{cell}>{_dice(before)}</td><td{cell}>{_dice(after)}</td>"
            f"<td{cell}>{change}</td></tr>"
        )
    return (
        f"New: <b>{html.escape(outcome.version.name)}</b><br>"
        f"Current: <b>{html.escape(outcome.current)}</b>"
        f"<table>{''.join(rows)}</table>"
        "<small>held-out: your pairs that the fine-tune did not train on; reference: 32 "
        "Kvasir-SEG test images shipped with the plugin (a drop means forgetting)</small>"
    )


class RetrainSection(Container):
    """Training steps, Fine-tune / Resume, the before/after panel, Delete version, and the
    command to run the fine-tune outside napari.

    Args:
        main: The dock widget this section belongs to (model picker, dataset folder,
            progress, status and Messages field).
    """

    def __init__(self, main: LVUNetWidget) -> None:
        # The panel spans the section's width; only the two fields have labels beside them.
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self._main = main
        self.job: FinetuneJob | None = None  # the fine-tune child process, if running
        self._job_weights: str | None = None  # the model key the running job started from
        self._job_base: dict[str, Any] = {}
        self._following = False
        self.resume_state: ResumeState | None = None
        self.outcome: BeforeAfter | None = None  # the result the panel shows
        self._signals = _JobSignals()
        self._signals.step.connect(self._on_step)
        self._signals.done.connect(self._on_done)
        self._signals.failed.connect(self._on_failed)
        self._signals.cancelled.connect(self._on_cancelled)

        self.command = LineEdit(label="Fine-tune command", value="")
        self.command.native.setReadOnly(True)
        self.steps = SpinBox(label="Training steps", min=1, max=100_000, value=100)
        self.finetune_button = PushButton(text="Fine-tune")
        self.resume_button = PushButton(text="Resume", visible=False)
        self.delete_button = PushButton(text="Delete version", enabled=False)
        self.command.tooltip = "The command that fine-tunes outside napari; select and copy it."
        self.steps.tooltip = (
            "How long fine-tuning trains: each step learns from 4 of your corrections and "
            "1 shipped image. 100 steps adapt the model to a new centre's images in about "
            "6 minutes on a 2-core laptop CPU."
        )
        self.finetune_button.tooltip = (
            "Retrain the chosen model on the saved corrections, in the background. When it "
            "ends you see whether it helped, and choose whether to use the new model."
        )
        self.resume_button.tooltip = (
            "Go on with the fine-tune that was cancelled or stopped, from the step it "
            "reached, on the same corrections (they must be unchanged)."
        )
        self.delete_button.tooltip = (
            "Delete the model version chosen in the Model picker (asks first). The bundled "
            "model cannot be deleted."
        )

        # The before/after panel, shown when a fine-tune ends.
        self.result_text = WrappedText(value="")
        self.warning_text = WrappedText(value="")
        self.warning_text.native.setStyleSheet(_WARN_STYLE)
        self.accept_button = PushButton(text="Use the new model")
        self.reject_button = PushButton(text="Keep the current model")
        self.result_text.tooltip = (
            "Held-out Dice: on the pairs of your folder that the fine-tune held out (never "
            "trained on): does the new model segment your images better?\n"
            "Reference Dice: on 32 Kvasir-SEG test images shipped with the plugin: does the "
            "new model still segment what it could (a drop means forgetting)?"
        )
        self.accept_button.tooltip = "Make the new version the current model (also next time)."
        self.reject_button.tooltip = (
            "Keep the current model; the new version stays in the Model picker, where it can "
            "be chosen or deleted later."
        )
        self.panel = Container(
            labels=False,
            widgets=[self.result_text, self.warning_text, self.accept_button, self.reject_button],
        )
        self.panel.margins = (0, 0, 0, 0)
        self.panel.visible = False

        steps_row = Container(labels=True, widgets=[self.steps])
        command_row = Container(labels=True, widgets=[self.command])
        for row in (steps_row, command_row):
            row.margins = (0, 0, 0, 0)
        self.extend(
            [
                steps_row,
                self.finetune_button,
                self.resume_button,
                self.panel,
                self.delete_button,
                command_row,
            ]
        )
        self.finetune_button.changed.connect(self.finetune)
        self.resume_button.changed.connect(self.resume)
        self.delete_button.changed.connect(self.delete_version)
        self.accept_button.changed.connect(self.accept)
        self.reject_button.changed.connect(self.reject)
        # The picker is made after this section: follow it once the widget is built (the
        # widget may call follow_picker() itself right after making it; then this is a
        # no-op).
        QTimer.singleShot(0, self._follow_when_built)

    def _follow_when_built(self) -> None:
        try:
            alive = self._alive()
        except AttributeError:  # the widget's constructor failed half-way
            return
        if alive and not self._following and getattr(self._main, "model", None) is not None:
            self.follow_picker()

    def _alive(self) -> bool:
        return self._main._alive()

    # ------------------------------------------------------------ versions
    def model_choices(self) -> list[tuple[str, str]]:
        """The model picker's entries for the fine-tuned versions (``(label, key)``, the key
        being the version's weights file), oldest first; the bundled model is the
        registry's own entry."""
        return [(v.label, v.weights) for v in versions.list_versions() if not v.bundled]

    def follow_picker(self) -> None:
        """Start the model picker on the current version (unless another model was chosen
        already) and, from then on, make every version chosen in it the current one (call
        once the picker exists)."""
        model = self._main.model
        key = versions.current().weights
        # Only over the widget's default choice: never over a model the user chose.
        if model.value in (None, versions.BUNDLED_ID):
            if key not in model.choices:
                self._main._refresh_models()
            if key in model.choices:
                model.value = key
        if not self._following:
            self._following = True
            model.changed.connect(self._on_model_chosen)
            self._main.data_dir.changed.connect(self.refresh_resume)
        self._show_version_controls()
        self.refresh_resume()

    def _version_of(self, key: Any) -> versions.Version | None:
        """The registered version a picker key names (the bundled model included)."""
        if key is None:
            return None
        for version in versions.list_versions():
            if version.weights == str(key):
                return version
        return None

    def _on_model_chosen(self, key: Any) -> None:
        version = self._version_of(key)
        if version is not None and versions.current().id != version.id:
            try:
                versions.select(version.id)
            except (OSError, versions.VersionError) as err:
                show_warning(f"LV-UNet: could not remember {version.name} as current: {err}")
        self._show_version_controls()
        self.refresh_resume()

    def _show_version_controls(self) -> None:
        version = self._version_of(self._main.model.value)
        self.delete_button.enabled = version is not None and not version.bundled

    def delete_version(self) -> bool:
        """Delete the version chosen in the picker, after asking (the button).

        Returns:
            Whether it was deleted.
        """
        main = self._main
        version = self._version_of(main.model.value)
        if version is None or version.bundled:
            show_error("LV-UNet: choose a fine-tuned version to delete; the bundled model stays.")
            return False
        if self.job is not None and self._job_weights == version.weights:
            show_error(
                f"LV-UNet: {version.name} is being fine-tuned from; cancel that first, "
                "then delete it."
            )
            return False
        answer = main._ask(
            "Delete model version",
            f"Delete the model version {version.name}?\n\nIts weights file is removed from "
            f"{Path(version.weights).parent}; this cannot be undone. The bundled model is "
            "then chosen.",
            ("Delete",),
        )
        if answer != "Delete":
            return False
        try:
            versions.delete(version.id)
        except (OSError, versions.VersionError) as err:
            show_error(f"LV-UNet: could not delete {version.name}: {err}")
            return False
        if self.outcome is not None and self.outcome.version.id == version.id:
            self._close_panel()
        main._refresh_models()
        fallback = versions.current().weights
        if fallback in main.model.choices:
            main.model.value = fallback
        self._show_version_controls()
        main.status.value = f"deleted the model version {version.name}"
        show_info(f"LV-UNet: deleted the model version {version.name}.")
        return True

    # ------------------------------------------------------------ fine-tune
    def update_command(self, _value: Any = None) -> None:
        """Show the shell command that fine-tunes the chosen model on the dataset folder."""
        main = self._main
        folder = main.data_dir.value
        if folder and str(folder) not in ("", "."):
            self.command.value = finetune_command(folder, main.model.value or "")

    def _folder(self) -> Path | None:
        folder = self._main.data_dir.value
        if not folder or str(folder) in ("", ".") or not Path(folder).is_dir():
            return None
        return Path(folder)

    def refresh_resume(self, _value: Any = None) -> None:
        """Offer "Resume (step k of N)" when the chosen model and folder have a resume
        state whose pairs are unchanged."""
        folder, model = self._folder(), self._main.model.value
        state = None
        if folder is not None and model is not None and self.job is None:
            state = find_resume(folder, model)
            if state is not None and not state.matches_data(folder):
                logger.info("not offering to resume %s: the pairs changed since", state.path)
                state = None
        self.resume_state = state
        self.resume_button.visible = state is not None
        if state is not None:
            self.resume_button.text = f"Resume ({state.describe()})"

    def _can_start(self) -> Path | None:
        main = self._main
        if main.busy:
            show_warning("LV-UNet is busy: wait for the running job, or press Cancel.")
            return None
        folder = self._folder()
        if folder is None:
            show_error("Choose an existing dataset folder (saved with 'Save for training').")
            return None
        if main.model.value is None:
            show_error("No model selected to fine-tune.")
            return None
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
            return None
        return folder

    def finetune(self) -> None:
        """Fine-tune the current model on the dataset folder in a child process (the button).

        The child is ``python -m training.finetune ... --progress json``; napari's process
        never imports torch, and a crash or out-of-memory kill of the child ends as a
        notification. When it ends, the new weights are a new version and the
        before/after panel asks whether to use them.
        """
        folder = self._can_start()
        if folder is not None:
            self._start(finetune_argv(folder, self._main.model.value, steps=int(self.steps.value)))

    def resume(self) -> None:
        """Go on with the interrupted fine-tune the Resume button names, with its options."""
        folder = self._can_start()
        state = self.resume_state
        if folder is None or state is None:
            return
        extra: list[str] = []
        for key, flag in _RESUME_FLAGS:
            value = state.options.get(key)
            if value is not None and key not in ("steps", "epochs"):
                extra += [flag, str(value)]
        opts = state.options
        argv = finetune_argv(
            folder,
            self._main.model.value,
            steps=opts.get("steps") if opts.get("epochs") is None else None,
            epochs=opts.get("epochs"),
            resume=True,
            extra=extra,
        )
        self._start(argv, resuming=state)

    def _start(self, argv: list[str], resuming: ResumeState | None = None) -> None:
        main = self._main
        key = str(main.model.value)
        try:
            sha = start_sha256(key)
        except OSError as err:
            show_error(f"LV-UNet: cannot read the model to fine-tune: {err}")
            return
        version = self._version_of(key)
        self._job_base = {"name": version.name if version else Path(key).name, "sha256": sha}
        signals = self._signals
        job = FinetuneJob(
            argv,
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
        self.job, self._job_weights = job, key
        self._close_panel()
        self.resume_button.visible = False
        folder = Path(main.data_dir.value)
        main.progress.max, main.progress.value = 1, 0
        what = f"resuming at {resuming.describe()}" if resuming else "starting"
        main.status.value = f"fine-tuning on {folder.name}: {what}..."
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
        self._job_weights = None
        self._main.segment_button.enabled = self.finetune_button.enabled = True
        self._main.cancel_button.enabled = False
        self.refresh_resume()

    @if_alive
    def _on_done(self, result: FinetuneResult) -> None:
        main = self._main
        started_from = self._job_weights
        base = dict(self._job_base)
        self._job_ended()
        main.progress.value = main.progress.max
        folder = main.data_dir.value
        try:
            version = versions.register(
                result.weights,
                data_folder=folder,
                heldout_dice=(result.heldout_dice_before, result.heldout_dice_after),
                reference_dice=(result.reference_dice_before, result.reference_dice_after),
                base=base,
            )
        except (OSError, versions.VersionError) as err:
            # The weights are still on disk: offer them as a file, as before versions.
            main.add_weights_file(result.weights, select=False)
            main._show_details(
                f"Fine-tuned weights (not kept as a version: {err}):\n{result.weights}"
            )
            show_error(f"LV-UNet: the fine-tuned weights could not be kept as a version: {err}")
            return
        main._refresh_models()
        current = self._version_of(started_from)
        outcome = BeforeAfter(
            version=version,
            current=current.name if current is not None else Path(str(started_from)).name,
            heldout=(result.heldout_dice_before, result.heldout_dice_after),
            reference=(result.reference_dice_before, result.reference_dice_after),
        )
        self.show_outcome(outcome)
        stopped = ""
        if result.resume_step is not None and result.total_steps:
            stopped = (
                f" (stopped at its time limit, step {result.resume_step} of {result.total_steps})"
            )
        main.status.value = f"fine-tuned{stopped}: use the new model?"
        main._show_details(
            f"Fine-tuned weights{stopped}, kept as the model version {version.name}:\n"
            f"{version.weights}\nheld-out Dice: {_comparison(*outcome.heldout)}\n"
            f"reference Dice: {_comparison(*outcome.reference)}"
        )
        show_info("LV-UNet: fine-tuning finished; compare the new model in the Retrain section.")

    def show_outcome(self, outcome: BeforeAfter) -> None:
        """Show the before/after panel of a fine-tune's new version."""
        self.outcome = outcome
        self.result_text.value = _table(outcome)
        if outcome.forgetting:
            self.warning_text.value = (
                f"The reference Dice drops by {outcome.reference_drop:.3f} (more than "
                f"{REFERENCE_DROP_WARNING}): the new model may have forgotten part of what "
                "it could segment. Check it on your images before using it."
            )
        else:
            self.warning_text.value = ""
        self.warning_text.visible = outcome.forgetting
        self.panel.visible = True

    def _close_panel(self) -> None:
        self.outcome = None
        self.panel.visible = False

    def accept(self) -> None:
        """Use the new model: select its version in the picker (and as the current one)."""
        outcome, main = self.outcome, self._main
        if outcome is None:
            return
        self._close_panel()
        key = outcome.version.weights
        if key not in main.model.choices:
            main._refresh_models()
        if key not in main.model.choices:
            show_error(f"LV-UNet: the model version {outcome.version.name} is gone.")
            return
        main.model.value = key  # the picker makes it the current version
        versions.select(outcome.version.id)  # also when the picker showed it already
        main.status.value = f"using the new model {outcome.version.name}"
        show_info(f"LV-UNet: now using {outcome.version.name}.")

    def reject(self) -> None:
        """Keep the current model; the new version stays listed (and can be deleted)."""
        outcome = self.outcome
        if outcome is None:
            return
        self._close_panel()
        self._main.status.value = f"kept {outcome.current}"
        show_info(
            f"LV-UNet: kept {outcome.current}. The new version {outcome.version.name} stays in "
            "the Model picker; choose it there later, or delete it."
        )

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
        text = "Fine-tuning cancelled; no weights were written."
        if self.resume_state is not None:
            text += f" 'Resume' goes on from {self.resume_state.describe()}."
        main._show_details(text)
        show_info(f"LV-UNet: {text}")
