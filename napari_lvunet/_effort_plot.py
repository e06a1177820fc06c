"""A small plot of correction effort for the dock widget: Dice(proposal, corrected) per pair.

One dot per saved pair whose proposal is known, in save order, coloured by the model
version that proposed it; each version's mean is a short horizontal line across its
dots. Dots climbing towards 1 from one version to the next show that retraining pays
off: the user has less to correct. The data come from :mod:`napari_lvunet.effort`
(the dataset's ``records/``); the full table is the tooltip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QFontMetrics, QPainter, QPaintEvent, QPalette, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from . import effort

__all__ = ["VERSION_COLOURS", "EffortPlot"]

#: Colours of successive model versions: apart from each other, readable on napari's
#: dark and light themes.
VERSION_COLOURS = ("#00c8ff", "#ffb000", "#40d040", "#ff50c8", "#a080ff", "#ff6a3d")

_HEIGHT = 120
_LEFT, _RIGHT, _TOP, _BOTTOM = 30, 8, 20, 8  # plot margins: y labels left, legend on top
_DOT = 3.0  # dot radius, px


@dataclass(frozen=True)
class _Series:
    label: str
    colour: QColor
    points: list[tuple[int, float]]  # (position among plotted pairs, Dice)
    mean: float | None
    pairs: int


class EffortPlot(QWidget):
    """Dice(proposal, corrected) per saved pair, by model version (about 120 px high).

    :meth:`refresh` reads a dataset folder's records; :meth:`set_rows` takes rows read
    already (:func:`napari_lvunet.effort.read_records`).
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(_HEIGHT)
        self.setMaximumHeight(_HEIGHT)
        self.setMinimumWidth(160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._series: list[_Series] = []
        self._count = 0  # plotted pairs
        self._unscored = 0
        self.setToolTip("Correction effort: saved pairs appear here.")

    # ------------------------------------------------------------------ data

    def refresh(self, folder: str | os.PathLike[str] | None) -> None:
        """Read ``folder``'s correction records and redraw (empty for None)."""
        rows = effort.read_records(folder) if folder else []
        self.set_rows(rows)

    def set_rows(
        self, rows: Sequence[effort.EffortRow], names: dict[str, str] | None = None
    ) -> None:
        """Plot these records (in save order); ``names``: sha256 -> version name."""
        trends = effort.trend(rows, names) if rows else []
        labels = effort.version_labels(rows, trends)
        order = {t.label: i for i, t in enumerate(trends)}
        points: dict[str, list[tuple[int, float]]] = {t.label: [] for t in trends}
        position = 0
        for row, label in zip(rows, labels, strict=True):
            if row.dice is None:
                continue
            points[label].append((position, row.dice))
            position += 1
        self._count = position
        self._unscored = sum(1 for r in rows if r.dice is None)
        self._series = [
            _Series(
                t.label,
                self.colour_of(order[t.label]),
                points[t.label],
                t.mean_dice,
                t.pairs,
            )
            for t in trends
            if points[t.label]
        ]
        if rows:
            tip = "Dice(model proposal, corrected mask) per saved pair:\n" + effort.trend_table(
                trends
            )
            if self._unscored:
                tip += f"\n{self._unscored} pair(s) saved without a model proposal (not plotted)"
        else:
            tip = "Correction effort: saved pairs appear here."
        self.setToolTip(tip)
        self.update()

    @staticmethod
    def colour_of(index: int) -> QColor:
        """The colour of the ``index``-th model version (in order of first use)."""
        return QColor(VERSION_COLOURS[index % len(VERSION_COLOURS)])

    @property
    def series(self) -> list[tuple[str, QColor, list[tuple[int, float]], float | None]]:
        """What is drawn: per version its label, colour, (position, Dice) and mean."""
        return [(s.label, QColor(s.colour), list(s.points), s.mean) for s in self._series]

    # --------------------------------------------------------------- geometry

    def plot_rect(self) -> QRectF:
        """The area of the dots: x = pairs in save order, y = Dice 0 (bottom) .. 1 (top)."""
        return QRectF(
            _LEFT,
            _TOP,
            max(self.width() - _LEFT - _RIGHT, 1),
            max(self.height() - _TOP - _BOTTOM, 1),
        )

    def point_at(self, position: int, dice: float) -> QPointF:
        """Where the pair at ``position`` (among plotted pairs) with ``dice`` is drawn."""
        rect = self.plot_rect()
        step = rect.width() / max(self._count, 1)
        x = rect.left() + step * (position + 0.5)
        y = rect.bottom() - float(dice) * rect.height()
        return QPointF(x, y)

    def _mean_span(self, series: _Series) -> tuple[float, float]:
        first = self.point_at(series.points[0][0], 0).x()
        last = self.point_at(series.points[-1][0], 0).x()
        return first - 2 * _DOT - 2, last + 2 * _DOT + 2

    # ---------------------------------------------------------------- drawing

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        try:
            painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
            self._draw(painter)
        finally:
            painter.end()

    def _draw(self, painter: QPainter) -> None:
        palette = self.palette()
        text = palette.color(QPalette.ColorRole.WindowText)
        faint = QColor(text)
        faint.setAlpha(70)
        font = QFont(self.font())
        font.setPointSizeF(max(font.pointSizeF() * 0.85, 6.0))
        painter.setFont(font)
        metrics = QFontMetrics(font)
        rect = self.plot_rect()

        # Axis 0..1: grid lines and labels.
        for value in (0.0, 0.5, 1.0):
            y = rect.bottom() - value * rect.height()
            painter.setPen(
                QPen(faint, 1, Qt.PenStyle.DashLine if value == 0.5 else Qt.PenStyle.SolidLine)
            )
            painter.drawLine(QPointF(rect.left(), y), QPointF(rect.right(), y))
            painter.setPen(text)
            label = f"{value:g}"
            painter.drawText(
                QRectF(0, y - metrics.height() / 2, _LEFT - 4, metrics.height()),
                int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter),
                label,
            )

        if not self._series:
            painter.setPen(text)
            painter.drawText(
                rect,
                int(Qt.AlignmentFlag.AlignCenter),
                "Dice(proposal, corrected) per saved pair\nappears here after a save",
            )
            return

        for series in self._series:
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(series.colour)
            for position, dice in series.points:
                painter.drawEllipse(self.point_at(position, dice), _DOT, _DOT)
            if series.mean is not None:
                left, right = self._mean_span(series)
                y = self.point_at(0, series.mean).y()
                painter.setPen(QPen(series.colour, 2))
                painter.drawLine(QPointF(left, y), QPointF(right, y))

        # Legend: one swatch and "name mean" per version, left to right, on top.
        x = float(_LEFT)
        for series in self._series:
            mean = "" if series.mean is None else f": Dice {series.mean:.2f}"
            entry = metrics.elidedText(f"{series.label}{mean}", Qt.TextElideMode.ElideMiddle, 140)
            width = 10 + metrics.horizontalAdvance(entry) + 10
            if x + width > self.width() - _RIGHT and x > _LEFT:
                painter.setPen(text)
                painter.drawText(QPointF(x, _TOP - 6), "...")
                break
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(series.colour)
            painter.drawRect(QRectF(x, _TOP - 6 - 7, 7, 7))
            painter.setPen(text)
            painter.drawText(QPointF(x + 10, _TOP - 6), entry)
            x += width
