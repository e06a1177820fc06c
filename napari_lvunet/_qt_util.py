"""Small Qt/napari helpers shared by the dock widget's sections."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from magicgui.widgets import ComboBox
from qtpy.QtWidgets import QComboBox, QMessageBox, QWidget

__all__ = ["ask", "compact", "if_alive", "real"]


def real(obj: Any) -> Any:
    """The object behind napari's ``PublicOnlyProxy``.

    napari hands plugin widgets a proxied viewer, and each access returns a new proxy of a
    layer; identity checks and weak references need the layer itself.
    """
    return getattr(obj, "__wrapped__", obj)


def compact(combo: ComboBox) -> None:
    """Keep a picker from widening the dock with a long layer or file name."""
    native = combo.native
    if isinstance(native, QComboBox):
        native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        native.setMinimumContentsLength(12)


def if_alive(method: Callable[..., Any]) -> Callable[..., Any]:
    """Skip a callback that arrives after the widget's Qt side was deleted.

    Worker signals and viewer events can still fire while napari closes; touching a
    deleted Qt widget then would raise inside the event loop. The decorated method's
    object has an ``_alive()`` method.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._alive():
            return None
        return method(self, *args, **kwargs)

    return wrapper


def ask(parent: QWidget, title: str, text: str, buttons: tuple[str, ...]) -> str | None:
    """Ask the user; returns the button text chosen, or None for Cancel."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle(title)
    box.setText(text)
    chosen = {box.addButton(b, QMessageBox.ButtonRole.AcceptRole): b for b in buttons}
    box.setDefaultButton(box.addButton(QMessageBox.StandardButton.Cancel))
    box.exec()
    return chosen.get(box.clickedButton())
