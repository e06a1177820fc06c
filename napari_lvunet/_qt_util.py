"""Small Qt/napari helpers shared by the dock widget's sections."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from magicgui.widgets import ComboBox, Container, Label, PushButton
from magicgui.widgets.bases import Widget
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtWidgets import QComboBox, QLabel, QMessageBox, QSizePolicy, QWidget

__all__ = ["Group", "WrappedText", "ask", "compact", "if_alive", "real"]


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


class Group(Container):
    """A titled group of controls that folds away: a header with an arrow shows or hides it.

    magicgui has no collapsible container. The header is a flat, checkable push button
    (so keyboard users reach it with Tab and Space); ``body`` holds the controls, with
    their labels. After construction, ``append``, ``extend`` and ``insert`` add to the
    body, so another section can put its panel into a group.

    Args:
        title: The header's text.
        widgets: The controls.
        expanded: Whether the body shows at first.
        labels: Whether the body shows its controls' labels beside them.
        tooltip: The header's tooltip (default: "Show or hide <title>.").
    """

    def __init__(
        self,
        title: str,
        widgets: Sequence[Widget] = (),
        *,
        expanded: bool = True,
        labels: bool = True,
        tooltip: str = "",
    ) -> None:
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self._title = title
        self._note = ""
        self.header = PushButton(text=title)
        self.header.tooltip = tooltip or f"Show or hide {title}."
        button = self.header.native
        button.setCheckable(True)
        button.setFlat(True)
        button.setStyleSheet("text-align: left; font-weight: bold; padding: 3px 2px;")
        # The title never widens the dock; a long one is cut by the button itself.
        button.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        button.setMinimumWidth(60)
        self.body = Container(labels=labels, widgets=widgets)
        self.body.margins = (10, 0, 0, 6)
        super().insert(0, self.header)
        super().insert(1, self.body)
        button.toggled.connect(self._show_body)
        button.setChecked(expanded)
        self._show_body(expanded)

    def insert(self, key: int, widget: Widget) -> None:
        """Insert into the body (the header and body themselves are placed at start)."""
        body = getattr(self, "body", None)
        if body is None or widget is body:
            super().insert(key, widget)
            return
        # append / extend ask for the group's own end: the body's end.
        body.insert(len(body) if key >= len(self) else max(key, 0), widget)

    @property
    def expanded(self) -> bool:
        """Whether the body shows."""
        return self.header.native.isChecked()

    @expanded.setter
    def expanded(self, value: bool) -> None:
        self.header.native.setChecked(bool(value))

    @property
    def note(self) -> str:
        """A short note after the title (e.g. "new message"), or ``""``."""
        return self._note

    @note.setter
    def note(self, text: str) -> None:
        self._note = text
        self._show_header()

    def _show_body(self, expanded: bool) -> None:
        self.body.native.setVisible(bool(expanded))
        self._show_header()

    def _show_header(self) -> None:
        arrow = "\u25be" if self.expanded else "\u25b8"  # a down / right triangle
        note = f"  ({self._note})" if self._note else ""
        self.header.native.setText(f"{arrow} {self._title}{note}")


class _FitHeight(QObject):
    """Keeps a word-wrapped label exactly as tall as its text at its current width."""

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if isinstance(obj, QLabel) and event.type() == QEvent.Type.Resize:
            fit_height(obj)
        return False


def fit_height(label: QLabel) -> None:
    """Make a word-wrapped label as tall as its text needs at its width."""
    height = label.heightForWidth(max(label.width(), label.minimumWidth()))
    if height > 0 and label.minimumHeight() != height:
        label.setMinimumHeight(height)
        label.setMaximumHeight(height)


class WrappedText(Label):
    """Rich text that wraps at the dock's width, is as tall as it needs, never widens the dock.

    Qt's layouts do not pass a wrapped label's height for its width up through magicgui's
    containers; this label sets its own height whenever its width or text changes.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        native = self.native
        native.setWordWrap(True)
        native.setTextFormat(Qt.TextFormat.RichText)
        native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        native.setMinimumWidth(60)
        self._fit = _FitHeight(native)
        native.installEventFilter(self._fit)

    @property
    def value(self) -> str:
        return self.native.text()

    @value.setter
    def value(self, text: Any) -> None:
        Label.value.fset(self, str(text))  # type: ignore[attr-defined]
        fit_height(self.native)
