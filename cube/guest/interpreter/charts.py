"""A matplotlib Figure as the chart object the SDK models (``e2b_code_interpreter/charts.py``).

Runs inside the Python kernel (loaded by ``kernel_startup.py`` the first time a Figure is
displayed, so matplotlib is already imported) and returns plain JSON-ready data:

- one chart per visible Axes, classified by what was drawn on it: wedges are a ``pie``, bar
  containers a ``bar`` chart, boxplots (recorded by ``kernel_startup``'s hook on ``Axes.bxp``,
  since a boxplot's lines alone do not say what they are) ``box_and_whisker``, Line2D artists a
  ``line`` chart, scatter collections a ``scatter`` chart, anything else ``unknown``;
- several charted Axes make a ``superchart`` titled by the figure's suptitle;
- axis values are floats, ISO-8601 strings on date axes and category names on categorical
  axes; a label's trailing ``(unit)`` or ``[unit]`` is its unit.

It must not import cube: the kernel's ``sys.path`` is the user's.
"""

from __future__ import annotations

import math
import re
from typing import Any

from matplotlib import category, dates
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import PathPatch, Wedge

_UNIT = re.compile(r"[(\[]([^()\[\]]+)[)\]]\s*$")
_DATE_FORMATTERS = (dates.DateFormatter, dates.AutoDateFormatter, dates.ConciseDateFormatter)


def _text(value: str) -> str | None:
    return value or None


def _unit(label: str | None) -> str | None:
    match = _UNIT.search(label or "")
    return match.group(1).strip() if match else None


def _scale(axis: Axis) -> str:
    formatter = axis.get_major_formatter()
    if isinstance(formatter, _DATE_FORMATTERS):
        return "datetime"
    if isinstance(formatter, category.StrCategoryFormatter):
        return "categorical"
    return str(axis.get_scale())


def _number(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def _value(axis: Axis, scale: str, v: Any) -> float | str | None:
    """An axis coordinate as the user would read it: a date, a category or a number."""
    if scale == "datetime":
        return dates.num2date(float(v)).isoformat()
    if scale == "categorical" and axis.units is not None:
        names = {pos: name for name, pos in getattr(axis.units, "_mapping", {}).items()}
        if float(v) in names:
            return str(names[float(v)])
    return _number(v)


def _axis(ax: Axes, which: str) -> dict[str, Any]:
    axis = ax.xaxis if which == "x" else ax.yaxis
    scale = _scale(axis)
    lo, hi = sorted(axis.get_view_interval())
    span = (hi - lo) * 1e-9
    ticks, labels = [], []
    for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=False):
        if lo - span <= loc <= hi + span:
            ticks.append(_value(axis, scale, loc))
            labels.append(label.get_text())
    name = _text(axis.get_label_text())
    return {
        f"{which}_label": name,
        f"{which}_unit": _unit(name),
        f"{which}_ticks": ticks,
        f"{which}_tick_labels": labels,
        f"{which}_scale": scale,
    }


def _labels_2d(ax: Axes) -> dict[str, Any]:
    x, y = _text(ax.get_xlabel()), _text(ax.get_ylabel())
    return {"x_label": x, "y_label": y, "x_unit": _unit(x), "y_unit": _unit(y)}


def _tick_name(axis: Axis, position: float) -> str:
    """The category or tick label drawn at ``position``, else the number itself."""
    scale = _scale(axis)
    value = _value(axis, scale, position)
    if isinstance(value, str):
        return value
    for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=False):
        if math.isclose(loc, position, rel_tol=1e-9, abs_tol=1e-9) and label.get_text():
            return label.get_text()
    return f"{position:g}"


def _point_chart(ax: Axes, kind: str, series: list[tuple[str, Any]]) -> dict[str, Any]:
    x_scale, y_scale = _scale(ax.xaxis), _scale(ax.yaxis)
    elements = [
        {
            "label": label,
            "points": [[_value(ax.xaxis, x_scale, x), _value(ax.yaxis, y_scale, y)] for x, y in xy],
        }
        for label, xy in series
    ]
    return {"type": kind, **_axis(ax, "x"), **_axis(ax, "y"), "elements": elements}


def _bar_chart(ax: Axes, containers: list[BarContainer]) -> dict[str, Any]:
    elements = []
    for container in containers:
        group = container.get_label() or ""
        horizontal = getattr(container, "orientation", "vertical") == "horizontal"
        for rect in container.patches:
            if horizontal:
                center, value, axis = (
                    rect.get_y() + rect.get_height() / 2,
                    rect.get_width(),
                    ax.yaxis,
                )
            else:
                center, value, axis = (
                    rect.get_x() + rect.get_width() / 2,
                    rect.get_height(),
                    ax.xaxis,
                )
            elements.append(
                {"label": _tick_name(axis, center), "group": group, "value": _number(value)}
            )
    return {"type": "bar", **_labels_2d(ax), "elements": elements}


def _pie_chart(wedges: list[Wedge]) -> dict[str, Any]:
    elements = [
        {
            "label": w.get_label(),
            # matplotlib keeps wedge angles as float32 (~7 significant digits): a 36° wedge
            # reads 35.999996, and past 4 decimals of a degree (up to 360) is that noise
            "angle": round(abs(w.theta2 - w.theta1), 4),
            "radius": _number(w.r),
        }
        for w in wedges
    ]
    return {"type": "pie", "elements": elements}


def _extent(artist: Any, vertical: bool) -> list[float]:
    if isinstance(artist, PathPatch):
        values = artist.get_path().vertices[:, 1 if vertical else 0]
    else:
        values = artist.get_ydata() if vertical else artist.get_xdata()
    return [float(v) for v in values]


def _box_chart(ax: Axes, plots: list[dict[str, list[Any]]]) -> dict[str, Any]:
    elements = []
    for plot in plots:
        whiskers, boxes = plot.get("whiskers", []), plot.get("boxes", [])
        medians, fliers = plot.get("medians", []), plot.get("fliers", [])
        for i, median in enumerate(medians):
            xs = [float(v) for v in median.get_xdata()]
            vertical = bool(len(set(xs)) > 1)  # a vertical box has a horizontal median line
            along = _extent(median, vertical)
            across = median.get_xdata() if vertical else median.get_ydata()
            box = _extent(boxes[i], vertical) if i < len(boxes) else along
            low = _extent(whiskers[2 * i], vertical) if 2 * i < len(whiskers) else box
            high = _extent(whiskers[2 * i + 1], vertical) if 2 * i + 1 < len(whiskers) else box
            outliers = _extent(fliers[i], vertical) if i < len(fliers) else []
            position = sum(float(v) for v in across) / max(len(across), 1)
            elements.append(
                {
                    "label": _tick_name(ax.xaxis if vertical else ax.yaxis, position),
                    "min": min(low),
                    "first_quartile": min(box),
                    "median": along[0],
                    "third_quartile": max(box),
                    "max": max(high),
                    "outliers": outliers,
                }
            )
    return {"type": "box_and_whisker", **_labels_2d(ax), "elements": elements}


def _lines(ax: Axes) -> list[Line2D]:
    return [line for line in ax.get_lines() if line.get_visible() and len(line.get_xdata())]


def axes_chart(ax: Axes) -> dict[str, Any]:
    """The chart drawn on one Axes, ``unknown`` with no elements when it is none we model."""
    title = _text(ax.get_title())
    boxplots = getattr(ax, "_cube_boxplots", None)
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    lines = _lines(ax)
    if boxplots:
        chart = _box_chart(ax, boxplots)
    elif wedges:
        chart = _pie_chart(wedges)
    elif bars:
        chart = _bar_chart(ax, bars)
    elif lines:
        chart = _point_chart(ax, "line", [(ln.get_label(), ln.get_xydata()) for ln in lines])
    elif scatters:
        chart = _point_chart(ax, "scatter", [(c.get_label(), c.get_offsets()) for c in scatters])
    else:
        chart = {"type": "unknown", "elements": []}
    return {**chart, "title": title}


def figure_chart(figure: Figure) -> dict[str, Any]:
    """The whole figure: one chart, a ``superchart`` of several, or ``unknown``."""
    figure.draw_without_rendering()  # tick labels and limits are only final after a draw
    axes = [ax for ax in figure.get_axes() if ax.get_visible() and not hasattr(ax, "_colorbar")]
    charts = [axes_chart(ax) for ax in axes]
    known = [c for c in charts if c["type"] != "unknown"]
    suptitle = figure._suptitle.get_text() if figure._suptitle is not None else ""
    if len(known) > 1:
        return {"type": "superchart", "title": _text(suptitle), "elements": known}
    chart = known[0] if known else (charts[0] if charts else {"type": "unknown", "elements": []})
    return {**chart, "title": chart.get("title") or _text(suptitle)}
