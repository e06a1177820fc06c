"""The widget's "Correct and save" section: which labels hold the corrections, where they go.

Labels layer -> ``_annotations.save_for_training`` -> dataset folder (``images/`` +
``masks/``), which ``training.finetune`` reads. The section never saves the model's own,
uncorrected result without asking, and never pairs a mask with another image's pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, PushButton
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info

from ._annotations import safe_stem, save_for_training

if TYPE_CHECKING:
    from ._widget import LVUNetWidget

__all__ = ["CorrectSection"]


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
            "Save the image and its corrected labels as training pairs (Ctrl+Shift+S). "
            "Nothing saved before is overwritten."
        )
        self.extend([self.corrected, self.data_dir, self.save_button])
        self.save_button.changed.connect(self.save_for_training)

    def _labels_choices(self, _widget: ComboBox) -> list[tuple[str, Labels]]:
        layers = self._main.viewer.layers
        return [(layer.name, layer) for layer in layers if isinstance(layer, Labels)]

    def save_for_training(self) -> list[tuple[Path, Path]]:
        """Write the image and its corrected labels as training pairs (the button).

        A Labels layer the widget made is saved with the image it was segmented from,
        whatever the Image picker shows, so a mask is never paired with another image's
        pixels; a Labels layer the user made is saved with the picked image.

        Returns:
            The ``(image, mask)`` paths written; empty when nothing was saved.
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
        try:
            pairs = save_for_training(
                np.asarray(image.data),
                np.asarray(labels.data),
                folder,
                safe_stem(image.name),
                rgb=bool(image.rgb),
                slices=slices,
            )
        except (ValueError, OSError) as err:
            show_error(f"Nothing saved: {err}")
            return []
        main.retrain.update_command()
        show_info(
            f"Saved {len(pairs)} image/mask pair(s) to {folder}. To fine-tune: "
            f"{main.retrain.command.value}"
        )
        main.status.value = f"saved {len(pairs)} pair(s)"
        return pairs
