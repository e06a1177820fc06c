"""The widget's "Correct and save" section: which labels hold the corrections, where they go.

Labels layer -> ``_annotations.save_for_training`` -> dataset folder (``images/`` +
``masks/``), which ``training.finetune`` reads. The section never saves the model's own,
uncorrected result without asking, and never pairs a mask with another image's pixels.
An image already in the dataset is never saved twice: with another mask the section asks
whether to update the saved pair (its previous mask is kept in ``history/``) or save
nothing. Each pair is saved with the model's proposal and a correction record; the
effort plot under Save shows Dice(proposal, corrected) per pair and model version, and
"Export effort CSV..." writes them as a table (:mod:`napari_lvunet.effort`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, PushButton
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from . import effort
from ._annotations import (
    HISTORY_DIR,
    DuplicateImageError,
    PartialSaveError,
    SaveResult,
    SliceIndex,
    iter_slices,
    safe_stem,
    save_for_training,
)
from ._effort_plot import EffortPlot
from ._uncertain import is_band_layer

if TYPE_CHECKING:
    from ._widget import LVUNetWidget

__all__ = ["UPDATE", "CorrectSection"]

#: The button that lets a save update the pair of an image saved before.
UPDATE = "Update its mask"


class CorrectSection(Container):
    """Corrected-labels picker, dataset folder and "Save for training".

    Args:
        main: The dock widget this section belongs to (its pickers, tracks and status).
    """

    def __init__(self, main: LVUNetWidget) -> None:
        super().__init__(labels=True)
        self._main = main
        self.corrected = ComboBox(label="Corrected labels", choices=self._labels_choices)
        self.data_dir = FileEdit(label="Dataset folder", mode="d")
        self.save_button = PushButton(text="Save for training")
        self.corrected.tooltip = "The labels you corrected, to save as training examples."
        self.data_dir.tooltip = (
            "The folder where corrections are saved (images/ and masks/) and fine-tuning "
            "reads them."
        )
        self.save_button.tooltip = (
            "Save the image and its corrected labels as training pairs (Ctrl+Shift+S), "
            "with the model's proposal and a record of what you corrected. Nothing saved "
            "before is overwritten; an image saved before is updated only if you agree."
        )
        self.export_button = PushButton(text="Export effort CSV...")
        self.export_button.tooltip = (
            "Write one row per saved pair: the model version, the pixels you added and "
            "removed, and Dice(proposal, corrected)."
        )
        self.effort_plot = EffortPlot()
        self.extend([self.corrected, self.data_dir, self.save_button, self.export_button])
        self.native.layout().addWidget(self.effort_plot)  # under Save
        self.save_button.changed.connect(self.save_for_training)
        self.export_button.changed.connect(lambda: self.export_csv())
        self.data_dir.changed.connect(self.refresh_effort)

    def _labels_choices(self, _widget: ComboBox) -> list[tuple[str, Labels]]:
        # The uncertain-band layer marks where the model hesitates: never a correction.
        layers = self._main.viewer.layers
        return [
            (layer.name, layer)
            for layer in layers
            if isinstance(layer, Labels) and not is_band_layer(layer)
        ]

    def _folder(self) -> Path | None:
        folder = self.data_dir.value
        if not folder or str(folder) in ("", "."):
            return None
        return Path(folder)

    def refresh_effort(self, _value: Any = None) -> None:
        """Redraw the effort plot from the dataset folder's correction records."""
        folder = self._folder()
        self.effort_plot.refresh(folder if folder is not None and folder.is_dir() else None)

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the dataset's correction effort, one row per pair (the button).

        Args:
            path: The CSV file; asked with a file dialog when None (which asks before
                replacing a file).

        Returns:
            The file written, or None when nothing was.
        """
        folder = self._folder()
        if folder is None or not folder.is_dir():
            show_error("Choose the dataset folder whose correction effort to export.")
            return None
        if path is None:
            chosen, _filter = QFileDialog.getSaveFileName(
                self.native, "Export correction effort", str(folder / "effort.csv"), "CSV (*.csv)"
            )
            if not chosen:
                return None
            path = chosen
        try:
            written = effort.write_csv(folder, path, overwrite=True)
        except OSError as err:
            show_error(f"Nothing exported: {err}")
            return None
        show_info(f"LV-UNet: wrote the correction effort of {folder.name} to {written}.")
        return written

    def _proposals(
        self, labels: Labels, slices: list[SliceIndex] | None
    ) -> tuple[dict[SliceIndex, np.ndarray], dict[SliceIndex, dict[str, Any]]]:
        """The model's proposal and its run, per slice to save that the widget made."""
        main = self._main
        n_leading = np.ndim(labels.data) - 2
        indices = slices if slices is not None else iter_slices(labels.data.shape[:n_leading])
        proposals, runs = {}, {}
        for index in indices:
            proposal = main.proposal_mask(labels, index or None)
            if proposal is not None:
                proposals[index] = proposal
                runs[index] = main.provenance(labels, index or None)
        return proposals, runs

    def save_for_training(self) -> SaveResult | list[tuple[Path, Path]]:
        """Write the image and its corrected labels as training pairs (the button).

        A Labels layer the widget made is saved with the image it was segmented from,
        whatever the Image picker shows, so a mask is never paired with another image's
        pixels; a Labels layer the user made is saved with the picked image. Of a stack
        the widget segmented, the whole-stack scope saves only the slices that hold
        corrections (all of them, after asking, when none does). An image in the dataset
        already with another mask is updated only when the user agrees.

        Returns:
            The :class:`~napari_lvunet._annotations.SaveResult` (the pairs, and which
            were written, updated or unchanged); empty when nothing was saved.
        """
        from ._widget import _real

        main = self._main
        image, labels = main.image.value, self.corrected.value
        folder = self.data_dir.value
        if image is None or labels is None:
            show_error("Save for training needs an image layer and a Labels layer.")
            return []
        if not folder or str(folder) in ("", "."):
            show_error("Choose a dataset folder to save into first.")
            return []
        track = main._tracks.get(_real(labels))
        if track is not None:
            source = track.image()
            if source is None or not any(_real(lay) is source for lay in main.viewer.layers):
                show_error(
                    f"Nothing saved: {labels.name!r} was segmented from an image layer that "
                    "is no longer open; reopen that image, or save a Labels layer of the "
                    "picked image."
                )
                return []
            if source is not _real(image):
                show_info(
                    f"LV-UNet: {labels.name!r} was segmented from {source.name!r}, so it is "
                    f"saved with {source.name!r}, not with the picked {image.name!r}."
                )
                image = source
        slices = None
        if image.ndim > 2 and main.scope.value == "slice":
            slices = [main._displayed_index(image)]
        chosen = ""  # "N corrected slices of M", when only those are saved
        if track is not None and slices is None and np.ndim(labels.data) > 2:
            # A result the widget made: its untouched slices are the model's own output,
            # which teaches it nothing (and would count as Dice 1.0 in the effort trend).
            every = list(iter_slices(labels.data.shape[: np.ndim(labels.data) - 2]))
            corrected = [index for index in every if main._holds_corrections(labels, index)]
            if corrected:
                slices = corrected
                chosen = f"{len(corrected)} corrected slice(s) of {len(every)}"
        if track is not None and not any(
            main._holds_corrections(labels, index) for index in (slices or [None])
        ):
            answer = main._ask(
                "Save the model's own result?",
                f"{labels.name!r} is exactly the model's result: it was never corrected. "
                "Saved as a training pair it teaches the model nothing and repeats its "
                "mistakes.\n\nCorrect it with napari's brush first, or pick the layer "
                "you corrected under 'Corrected labels'.",
                ("Save anyway",),
            )
            if answer is None:
                main.status.value = "nothing saved: the labels were never corrected"
                return []
        proposals, runs = self._proposals(labels, slices)

        def save(duplicates: str) -> SaveResult:
            return save_for_training(
                image.data,  # indexed per saved slice: a lazy video is never read whole
                np.asarray(labels.data),
                folder,
                safe_stem(image.name),
                rgb=bool(image.rgb),
                slices=slices,
                duplicates=duplicates,
                proposals=proposals,
                provenance=runs,
            )

        try:
            try:
                result = save("refuse")
            except DuplicateImageError as err:
                answer = main._ask(
                    "Image saved already",
                    f"This image is in the dataset already: {err}.\n\n'{UPDATE}' gives "
                    f"the saved pair your mask (its previous mask is kept in "
                    f"{HISTORY_DIR}/); Cancel saves nothing.",
                    (UPDATE,),
                )
                if answer != UPDATE:
                    main.status.value = "nothing saved: the image is in the dataset already"
                    return []
                result = save("update")
        except PartialSaveError as err:  # a failed save that could not be undone
            show_error(f"Save failed part-way: {err}")
            self.refresh_effort()
            return []
        except (ValueError, OSError) as err:  # a failed save is undone: nothing is saved
            show_error(f"Nothing saved: {err}")
            return []
        main.retrain.update_command()
        summary = result.summary()
        if chosen:
            summary = f"saved {chosen}: {summary}"
        show_info(f"Saved to {folder}: {summary}. To fine-tune: {main.retrain.command.value}")
        main.status.value = summary
        self.refresh_effort()
        return result
