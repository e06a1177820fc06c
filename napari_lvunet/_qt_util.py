"""Small Qt/napari helpers shared by the dock widget's sections."""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from magicgui.widgets import ComboBox, Container, Label, PushButton
from magicgui.widgets.bases import Widget
from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtWidgets import QComboBox, QLabel, QMessageBox, QSizePolicy, QWidget

__all__ = [
    "Group",
    "Job",
    "WrappedText",
    "ask",
    "compact",
    "if_alive",
    "no_repaint",
    "real",
    "run_in_background",
]


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


@contextlib.contextmanager
def no_repaint(widget: QWidget) -> Iterator[None]:
    """Change a widget without the immediate repaint some widgets do (QProgressBar does).

    The change is painted with the next ordinary repaint instead.
    """
    was = widget.updatesEnabled()
    widget.setUpdatesEnabled(False)
    try:
        yield
    finally:
        widget.setUpdatesEnabled(was)


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


class _Delivery(QObject):
    """Lives in the GUI thread; the job thread's results reach it as queued signals."""

    done = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.done.connect(self._deliver)

    @staticmethod
    def _deliver(job: Job) -> None:
        job._deliver()


class Job:
    """One function call on the background job thread (see :func:`run_in_background`).

    Attributes:
        finished: Whether its callbacks have run in the GUI thread.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        returned: Callable[[Any], Any] | None,
        errored: Callable[[BaseException], Any] | None,
        finished: Callable[[], Any] | None,
    ) -> None:
        self._func, self._args = func, args
        self._returned, self._errored, self._finished = returned, errored, finished
        self._outcome: tuple[bool, Any] = (False, None)
        self.finished = False
        self._on_finished: list[Callable[[], Any]] = []

    def when_finished(self, callback: Callable[[], Any]) -> None:
        """Call ``callback`` in the GUI thread once the job's own callbacks have run."""
        if self.finished:
            callback()
        else:
            self._on_finished.append(callback)

    def _run(self) -> None:  # in the job thread
        try:
            self._outcome = (True, self._func(*self._args))
        except BaseException as err:  # every failure goes to the GUI thread
            self._outcome = (False, err)

    def _deliver(self) -> None:  # in the GUI thread
        ok, value = self._outcome
        self._outcome = (False, None)  # do not keep a large result alive
        try:
            if ok and self._returned is not None:
                self._returned(value)
            elif not ok and self._errored is not None:
                self._errored(value)
        finally:
            self.finished = True
            try:
                if self._finished is not None:
                    self._finished()
            finally:
                for callback in self._on_finished:
                    callback()


class _JobThread:
    """One long-lived daemon thread that runs jobs in order.

    napari's ``create_worker`` starts a new QThread for every call; a thread waiting on a
    queue starts a job in microseconds instead. One thread per process serves every
    widget: jobs run one after another, as they would on 2 CPU cores anyway.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._delivery = _Delivery()  # made in the GUI thread, by the first submit
        self._thread = threading.Thread(target=self._loop, name="lvunet-jobs", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self._delivery.objectName()
        except RuntimeError:  # deleted with a QApplication that ended (tests make several)
            self._delivery = _Delivery()
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            job._run()
            # Queued: the GUI thread runs the callbacks. A RuntimeError: napari closed
            # while the job ran, and nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                self._delivery.done.emit(job)
            del job


_JOB_THREAD: _JobThread | None = None


def run_in_background(
    func: Callable[..., Any],
    *args: Any,
    returned: Callable[[Any], Any] | None = None,
    errored: Callable[[BaseException], Any] | None = None,
    finished: Callable[[], Any] | None = None,
) -> Job:
    """Run ``func(*args)`` on the process's job thread; callbacks run in the GUI thread.

    Call from the GUI thread. ``returned`` (with the result) or ``errored`` (with the
    exception) runs first, then ``finished``, always.

    Returns:
        The job.
    """
    global _JOB_THREAD
    if _JOB_THREAD is None:
        _JOB_THREAD = _JobThread()
    job = Job(func, args, returned, errored, finished)
    _JOB_THREAD.submit(job)
    return job
