"""The Retrain section (napari_lvunet._retrain) in a real napari viewer: model versions in
the picker across sessions, the before/after panel with Accept / Reject and the
forgetting warning, Delete version, and Resume of an interrupted fine-tune.

Real fine-tunes run as child processes on tiny generated folders (this process never
imports torch); every test has its own models folder (``NAPARI_LVUNET_MODELS``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lvunet_test_helpers import process_gone, tiny_pairs_folder, weights_in_child

from napari_lvunet import versions
from napari_lvunet.finetune_events import EXIT_OK, find_resume
from napari_lvunet.weights import DEFAULT_MODEL, file_sha256

pytestmark = pytest.mark.gui

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random fused weights, written by a child so that this process never imports torch."""
    return weights_in_child(tmp_path_factory.mktemp("weights") / "random.safetensors")


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv(versions.MODELS_ENV, str(folder))
    return folder


def _open_widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-lvunet", "LV-UNet segmentation")
    qtbot.wait(10)  # the event loop runs once, as napari's does after opening the dock
    return viewer, widget


def _wait_idle(qtbot, widget, timeout: int = 300_000) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


class _Notes:
    def __init__(self) -> None:
        from napari.utils.notifications import notification_manager

        self.records: list = []
        self._manager = notification_manager
        self._note = self.records.append
        notification_manager.notification_ready.connect(self._note)

    def messages(self, severity: str) -> list[str]:
        return [n.message for n in self.records if str(n.severity).lower().endswith(severity)]

    def close(self) -> None:
        self._manager.notification_ready.disconnect(self._note)


@pytest.fixture
def notes():
    recorder = _Notes()
    yield recorder
    recorder.close()


def _shown(widget) -> bool:
    """Whether a control is shown in its dock (the test viewer's window itself is hidden)."""
    return not widget.native.isHidden()


def _rows(retrain) -> list[list[str]]:
    """The cells of the before/after table, as the panel's label shows them."""
    from qtpy.QtGui import QTextDocument

    document = QTextDocument()
    document.setHtml(retrain.result_text.value)
    text = document.toPlainText()
    # Qt writes a table's cells one per line; the first two lines name the models, the
    # last one says what the two sets are.
    cells = text.split("\n")[2:-1]
    cells = cells[: len(cells) // 4 * 4]  # a last empty cell may come with a newline
    return [cells[i : i + 4] for i in range(0, len(cells), 4)]


def _change(pair) -> str:
    return f"{pair[1] - pair[0]:+.3f}"


@pytest.mark.slow
def test_a_finetune_becomes_a_version_kept_across_sessions_chosen_only_on_accept(
    make_napari_viewer, qtbot, notes, models, tmp_path, weights_file, monkeypatch
) -> None:
    torch_before = "torch" in sys.modules
    _viewer, widget = _open_widget(make_napari_viewer, qtbot)
    retrain = widget.retrain
    assert widget.model.value == DEFAULT_MODEL and not retrain.delete_button.enabled
    start = widget.add_weights_file(weights_file)
    folder = tiny_pairs_folder(tmp_path / "corrections", n=5)
    widget.data_dir.value = folder
    widget.steps.value = 2
    widget.finetune()
    _wait_idle(qtbot, widget)
    assert not notes.messages("error"), notes.messages("error")

    # A new version, listed in the picker but not chosen: the panel asks first.
    (new,) = [v for v in versions.list_versions() if not v.bundled]
    assert widget.model.value == start and versions.current().id == DEFAULT_MODEL
    assert (new.label, new.weights) in retrain.model_choices()
    assert new.weights in widget.model.choices
    assert Path(new.weights).parent == models and new.data_folder == str(folder.resolve())
    assert new.base == {"name": weights_file.name, "sha256": file_sha256(weights_file)}
    assert new.pairs == 5 and new.extra["finetune"]["steps"] == 2
    outcome = retrain.outcome
    assert _shown(retrain.panel) and outcome is not None and outcome.version == new
    assert outcome.heldout == (new.heldout_dice["before"], new.heldout_dice["after"])
    assert outcome.reference == (new.reference_dice["before"], new.reference_dice["after"])
    for value in (*outcome.heldout, *outcome.reference):
        assert 0.0 <= value <= 1.0
    before, after = outcome.reference
    assert _rows(retrain) == [
        ["", "current", "new", "change"],
        [
            "Held-out Dice",
            *(f"{d:.3f}" for d in outcome.heldout),
            _change(outcome.heldout),
        ],
        ["Reference Dice", f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}"],
    ]
    assert _shown(retrain.warning_text) == (before - after > 0.02)
    assert widget.status.value == "fine-tuned: use the new model?"
    assert ("torch" in sys.modules) == torch_before

    retrain.accept_button.changed.emit(True)  # "Use the new model"
    assert widget.model.value == new.weights and versions.current().id == new.id
    assert not _shown(retrain.panel) and retrain.delete_button.enabled

    # A new napari session starts on it, labelled with its date and held-out Dice.
    _viewer2, second = _open_widget(make_napari_viewer, qtbot)
    assert second.model.value == new.weights
    label = second.model.current_choice
    assert new.created[:10] in label and f"held-out Dice {new.heldout_dice['after']:.3f}" in label

    # Going back to the bundled model is choosing it; the next session starts there.
    second.model.value = DEFAULT_MODEL
    assert versions.current().id == DEFAULT_MODEL
    _viewer3, third = _open_widget(make_napari_viewer, qtbot)
    assert third.model.value == DEFAULT_MODEL and not third.retrain.delete_button.enabled

    # Delete asks first; "no" keeps it, "Delete" removes its files and the picker entry.
    third.model.value = new.weights
    asked: list[str] = []
    # (on the class: magicgui containers take instance attributes for their widgets)
    monkeypatch.setattr(type(third), "_ask", lambda self, title, text, buttons: asked.append(text))
    assert not third.retrain.delete_version() and Path(new.weights).is_file()
    monkeypatch.setattr(
        type(third), "_ask", lambda self, title, text, buttons: asked.append(text) or "Delete"
    )
    assert third.retrain.delete_version()
    assert len(asked) == 2 and new.name in asked[0]
    assert not any(models.glob(f"{new.id}.*"))
    assert new.weights not in third.model.choices and third.model.value == DEFAULT_MODEL
    assert [v.id for v in versions.list_versions()] == [DEFAULT_MODEL]


@pytest.mark.slow
def test_a_running_finetune_keeps_its_start_version_and_cancel_offers_resume(
    make_napari_viewer, qtbot, notes, models, tmp_path, weights_file, monkeypatch
) -> None:
    version = versions.register(weights_file, name="centre B")
    versions.select(version.id)
    _viewer, widget = _open_widget(make_napari_viewer, qtbot)
    retrain = widget.retrain
    assert widget.model.value == version.weights
    folder = tiny_pairs_folder(tmp_path / "corrections", n=5)
    widget.data_dir.value = folder
    widget.steps.value = 5000
    monkeypatch.setattr(type(widget), "_ask", lambda *a: pytest.fail("asked while refusing"))
    widget.finetune()
    job = retrain.job
    qtbot.waitUntil(lambda: widget.status.value.startswith("fine-tuning: epoch"), timeout=300_000)
    assert not retrain.delete_version()  # refused: the running job started from it
    assert any("being fine-tuned from" in m for m in notes.messages("error"))
    assert Path(version.weights).is_file()
    # Let it pass a periodic save of the resume state (every 5 steps), then cancel.
    qtbot.waitUntil(lambda: widget.progress.value >= 6, timeout=300_000)
    t0 = time.monotonic()
    widget.cancel()
    _wait_idle(qtbot, widget, timeout=10_000)
    assert time.monotonic() - t0 < 5.0 and process_gone(job.pid)
    assert widget.status.value == "cancelled"
    state = find_resume(folder, version.weights)
    assert state is not None and state.step >= 5 and state.total_steps == 5000
    assert _shown(retrain.resume_button)
    assert retrain.resume_button.text == f"Resume (step {state.step} of 5000)"
    assert f"goes on from step {state.step} of 5000" in widget.details.value
    assert not list((folder / "finetuned").glob("*.safetensors"))  # no weights written


def _interrupted_run(folder: Path, weights: Path, steps: int) -> None:
    """A fine-tune child stopped by its time limit after a step or two: a resume state."""
    cmd = [
        sys.executable, "-m", "training.finetune", "--data", str(folder), "--weights",
        str(weights), "--steps", str(steps), "--batch-size", "2", "--reference", "none",
        "--max-minutes", "0.0005", "--progress", "json",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]


@pytest.mark.slow
def test_resume_is_offered_for_unchanged_pairs_and_goes_on(
    make_napari_viewer, qtbot, notes, models, tmp_path, weights_file
) -> None:
    folder = tiny_pairs_folder(tmp_path / "corrections", n=5)
    _interrupted_run(folder, weights_file, steps=6)
    state = find_resume(folder, weights_file)
    assert state is not None and 1 <= state.step < 6

    _viewer, widget = _open_widget(make_napari_viewer, qtbot)
    retrain = widget.retrain
    widget.add_weights_file(weights_file)
    assert not _shown(retrain.resume_button)  # no folder chosen yet
    widget.data_dir.value = folder
    assert _shown(retrain.resume_button)
    assert retrain.resume_button.text == f"Resume (step {state.step} of 6)"

    # Changed pairs: not offered (the child would refuse them); offered again once undone.
    mask = folder / "masks" / "case0.png"
    kept = mask.read_bytes()
    mask.write_bytes((folder / "masks" / "case1.png").read_bytes())
    retrain.refresh_resume()
    assert not _shown(retrain.resume_button)
    mask.write_bytes(kept)
    retrain.refresh_resume()
    assert _shown(retrain.resume_button)

    steps: list[int] = []
    retrain._signals.step.connect(lambda step: steps.append(step.step))
    retrain.resume_button.changed.emit(True)
    assert "--resume" in retrain.job.argv and not _shown(retrain.resume_button)
    _wait_idle(qtbot, widget)
    assert not notes.messages("error"), notes.messages("error")
    assert steps == list(range(state.step + 1, 7))
    (new,) = [v for v in versions.list_versions() if not v.bundled]
    assert new.extra["finetune"]["resumed_from_step"] == state.step
    assert _shown(retrain.panel) and retrain.outcome.version == new
    assert find_resume(folder, weights_file) is None and not _shown(retrain.resume_button)


def test_reject_keeps_the_model_and_a_reference_drop_warns(
    make_napari_viewer, qtbot, models, weights_file, tmp_path
) -> None:
    from napari_lvunet._retrain import BeforeAfter

    version = versions.register(weights_file, name="centre B")
    _viewer, widget = _open_widget(make_napari_viewer, qtbot)
    retrain = widget.retrain
    assert widget.model.value == DEFAULT_MODEL and version.weights in widget.model.choices

    # The reference Dice falls by 0.05: a warning, in its own colour.
    retrain.show_outcome(BeforeAfter(version, DEFAULT_MODEL, (0.61, 0.83), (0.85, 0.80)))
    assert _shown(retrain.panel) and _shown(retrain.warning_text)
    assert _rows(retrain)[1:] == [
        ["Held-out Dice", "0.610", "0.830", "+0.220"],
        ["Reference Dice", "0.850", "0.800", "-0.050"],
    ]
    assert "drops by 0.050" in retrain.warning_text.value
    assert "color" in retrain.warning_text.native.styleSheet()
    assert 'color: #e8a33d; font-weight: bold;">-0.050<' in retrain.result_text.value
    retrain.reject_button.changed.emit(True)
    assert not _shown(retrain.panel)
    assert widget.model.value == DEFAULT_MODEL and versions.current().id == DEFAULT_MODEL
    assert version.weights in widget.model.choices  # still listed, can be chosen or deleted

    # A drop of 0.01 is within the tolerance: no warning; Accept chooses the version.
    retrain.show_outcome(BeforeAfter(version, DEFAULT_MODEL, (0.61, 0.83), (0.85, 0.84)))
    assert _shown(retrain.panel) and not _shown(retrain.warning_text)
    retrain.accept_button.changed.emit(True)
    assert widget.model.value == version.weights and versions.current().id == version.id
    # Neither Dice known (no held-out pairs, no reference set): said plainly.
    retrain.show_outcome(BeforeAfter(version, DEFAULT_MODEL, (None, None), (0.85, None)))
    assert _rows(retrain)[1:] == [
        ["Held-out Dice", "-", "-", ""],
        ["Reference Dice", "0.850", "-", ""],
    ]
    assert not _shown(retrain.warning_text)
