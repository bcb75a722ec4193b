"""``pareto.png``: test top-1 accuracy against batch-1 median latency for every row of the run report.

A deployer does not want "the fastest model" or "the most accurate one" but the best trade for a latency budget:
the points on the Pareto front (no other row is both at least as fast and at least as accurate) are the only ones
worth picking, and the dashed step line shows the best accuracy on offer at each latency. Whiskers run from the
fastest call (``min_ms``) to the 90th percentile, so a point whose tail crosses the budget is visible too.

matplotlib is imported inside ``plot_pareto`` only (Agg, a ``Figure`` object, no pyplot state), so importing this
module costs nothing for code that never draws.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from compressor.core.fileio import atomic_path

FIGSIZE_IN = (8.0, 5.5)
DPI = 150
DEFAULT_TITLE = "accuracy against latency"

# kind -> (marker, colour, legend label); unknown kinds fall back to OTHER_STYLE
KIND_STYLES = {
    "ensemble": ("s", "#1f77b4", "ensemble (teachers)"),
    "member": ("^", "#7f7f7f", "ensemble member"),
    "baseline": ("D", "#ff7f0e", "baseline (no distillation)"),
    "student": ("o", "#d62728", "student"),
    "generalist-student": ("P", "#2ca02c", "student from the generalist alone"),
}
OTHER_STYLE = ("X", "#9467bd", "other")

# candidate label positions around a point: (dx, dy) in points, horizontal and vertical alignment
_LABEL_SLOTS = [
    (7, 4, "left", "bottom"), (7, -4, "left", "top"), (-7, 4, "right", "bottom"), (-7, -4, "right", "top"),
    (0, 9, "center", "bottom"), (0, -9, "center", "top"),
    (7, 14, "left", "bottom"), (7, -14, "left", "top"), (-7, 14, "right", "bottom"), (-7, -14, "right", "top"),
    (0, 20, "center", "bottom"), (0, -20, "center", "top"),
]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by any other, sorted by latency ascending (ties: higher accuracy first).

    Each point is ``(latency, accuracy)``: lower latency and higher accuracy are better. A point is dominated when
    another has latency <= and accuracy >= with at least one of the two strict, so identical points are all kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best: float | None = None  # the best accuracy among the strictly faster points seen so far
    group_best: float | None = None
    previous_latency: float | None = None
    for i in order:
        latency, accuracy = points[i]
        if latency != previous_latency:  # a new latency: every earlier point is strictly faster
            if group_best is not None:
                best = group_best if best is None else max(best, group_best)
            group_best, previous_latency = accuracy, latency  # first of its group has the group's best accuracy
        if accuracy < group_best:  # same latency, lower accuracy: dominated
            continue
        if best is not None and accuracy <= best:  # a strictly faster point is at least as accurate
            continue
        front.append(i)
    return front


def plot_pareto(rows: list[dict], path: Path, batch: str = "1", title: str | None = None) -> Path | None:
    """Write accuracy vs median latency at ``batch`` (log x axis) for every row that has both; return the path.

    A row is drawn when ``accuracy["top1"]`` is a number and ``latency[batch]["median_ms"]`` is a positive number;
    others are skipped. Returns None, writing nothing, when no row has both. The PNG is written atomically (a
    temporary file beside ``path``, renamed on success); the parent folder is created if missing.
    """
    batch = str(batch)
    points = [point for point in (_point(row, batch) for row in rows) if point is not None]
    if not points:
        return None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")

    kinds_seen: list[str] = []
    for p in points:
        marker, colour, _ = KIND_STYLES.get(p["kind"], OTHER_STYLE)
        if p["kind"] not in kinds_seen:
            kinds_seen.append(p["kind"])
        if p["xerr"] is not None:
            ax.errorbar([p["x"]], [p["y"]], xerr=[[p["xerr"][0]], [p["xerr"][1]]], fmt="none", ecolor=colour,
                        elinewidth=1.0, capsize=3, alpha=0.55, zorder=2)
        ax.scatter([p["x"]], [p["y"]], marker=marker, s=48, color=colour, edgecolors="black", linewidths=0.6,
                   zorder=4)

    front = pareto_front([(p["x"], p["y"]) for p in points])
    front_x, front_y = [points[i]["x"] for i in front], [points[i]["y"] for i in front]
    if len(front) > 1:  # a lone point is its own front: no line to draw
        ax.step(front_x, front_y, where="post", linestyle="--", color="#2ca02c", linewidth=1.4, zorder=3)

    _set_limits(ax, points)
    ax.set_xlabel(f"batch-{batch} median latency, ms (log scale)")
    ax.set_ylabel("test top-1 accuracy, %")
    ax.set_title(title if title is not None else DEFAULT_TITLE)
    ax.grid(True, which="both", axis="x", alpha=0.25, linewidth=0.6)
    ax.grid(True, which="major", axis="y", alpha=0.25, linewidth=0.6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label(ax)))

    handles = []
    for kind in kinds_seen:
        marker, colour, label = KIND_STYLES.get(kind, OTHER_STYLE)
        handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=7, color=colour,
                              markeredgecolor="black", markeredgewidth=0.6, label=label))
    if len(front) > 1:
        handles.append(Line2D([], [], linestyle="--", color="#2ca02c", linewidth=1.4, label="Pareto front"))
    if any(p["xerr"] is not None for p in points):
        handles.append(Line2D([], [], color="grey", marker="|", markersize=7, alpha=0.7,
                              label="latency min to p90"))

    fig.tight_layout()
    _place_labels(ax, canvas.get_renderer(), points, list(zip(front_x, front_y)))
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _point(row: dict, batch: str) -> dict[str, Any] | None:
    """The plotted values of one row, or None when it lacks a top-1 accuracy or a usable latency at ``batch``."""
    top1 = (row.get("accuracy") or {}).get("top1")
    stats = (row.get("latency") or {}).get(batch)
    if not _finite(top1) or not isinstance(stats, dict) or not _finite(stats.get("median_ms")):
        return None
    median = float(stats["median_ms"])
    if median <= 0:  # a log axis cannot show it
        return None
    low, high = stats.get("min_ms"), stats.get("p90_ms")
    xerr = None
    if _finite(low) or _finite(high):
        xerr = (max(median - float(low), 0.0) if _finite(low) and float(low) > 0 else 0.0,
                max(float(high) - median, 0.0) if _finite(high) else 0.0)
    return {"x": median, "y": 100.0 * float(top1), "xerr": xerr, "kind": _kind(row),
            "label": f"{row.get('model', '?')} ({row.get('backend', '?')}, {row.get('precision', '?')})"}


def _kind(row: dict) -> str:
    """``row["kind"]``; for rows written before the field existed, the first word of the model's label."""
    kind = row.get("kind")
    if kind:
        return str(kind)
    first = str(row.get("model", "")).split(" ", 1)[0]
    return first if first in KIND_STYLES else "other"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _set_limits(ax, points: list[dict]) -> None:
    """Room around the data (whiskers included) so markers and labels stay inside the axes."""
    lows = [p["x"] - (p["xerr"][0] if p["xerr"] else 0.0) for p in points]
    highs = [p["x"] + (p["xerr"][1] if p["xerr"] else 0.0) for p in points]
    lo = math.log10(min(lows))  # whiskers start at min_ms > 0 (see _point), so every low is positive
    hi = math.log10(max(highs))
    span = max(hi - lo, 0.6)  # at least ~a factor of 4 across, so a lone point has room for its label
    centre = (hi + lo) / 2
    ax.set_xlim(10 ** (centre - 0.65 * span), 10 ** (centre + 0.65 * span))
    ys = [p["y"] for p in points]
    y_span = max(max(ys) - min(ys), 1.0)
    ax.set_ylim(max(min(ys) - 0.25 * y_span, 0.0), min(max(ys) + 0.25 * y_span, 100.0 + 0.05 * y_span))


def _minor_label(ax):
    """Label minor ticks by how wide the axis is: every one within a decade, 2 and 5 x 10^k within two, else none."""

    def label(value: float, _pos) -> str:
        lo, hi = ax.get_xlim()
        if hi / lo >= 100:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:g}" if hi / lo < 10 or mantissa in (2.0, 5.0) else ""

    return label


def _place_labels(ax, renderer, points: list[dict], front: list[tuple[float, float]]) -> None:
    """Annotate every point, choosing for each the slot that overlaps the axes' edge, other labels, markers,
    whiskers and the front's line least (a greedy search over a few offsets; enough for the rows a report has)."""
    axes_box = ax.get_window_extent(renderer)
    to_display = ax.transData.transform
    radius = 5.0 * ax.figure.dpi / 72  # markers are about 7 points across
    markers = [to_display((p["x"], p["y"])) for p in points]
    segments = []  # axis-aligned lines in display coordinates, (x0, y0, x1, y1): whiskers and the front's steps
    for p, (_, y) in zip(points, markers):
        if p["xerr"] is not None:
            x0 = to_display((p["x"] - p["xerr"][0], p["y"]))[0]
            x1 = to_display((p["x"] + p["xerr"][1], p["y"]))[0]
            segments.append((x0, y, x1, y))
    corners = [to_display(point) for point in front]
    for (xa, ya), (xb, yb) in itertools.pairwise(corners):  # where="post": across at the old height, then up
        segments += [(xa, ya, xb, ya), (xb, ya, xb, yb)]
    placed: list[tuple[float, float, float, float]] = []
    # top to bottom, then left to right: crowded clusters are usually at similar accuracy
    for index in sorted(range(len(points)), key=lambda i: (-points[i]["y"], points[i]["x"])):
        p = points[index]
        text = ax.annotate(p["label"], (p["x"], p["y"]), xytext=(0, 0), textcoords="offset points", fontsize=8,
                           zorder=5, annotation_clip=False,
                           bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                 "alpha": 0.7})
        text.set_in_layout(False)
        best = None
        for slot_index, (dx, dy, ha, va) in enumerate(_LABEL_SLOTS):
            text.set_position((dx, dy))
            text.set_horizontalalignment(ha)
            text.set_verticalalignment(va)
            box = text.get_window_extent(renderer)
            rect = (box.x0, box.y0, box.x1, box.y1)
            area = max(box.width * box.height, 1.0)
            inside = _overlap(rect, (axes_box.x0, axes_box.y0, axes_box.x1, axes_box.y1))
            cost = 20.0 * (area - inside)
            cost += 5.0 * sum(_overlap(rect, other) for other in placed)
            cost += 3.0 * sum(_overlap(rect, (mx - radius, my - radius, mx + radius, my + radius))
                              for i, (mx, my) in enumerate(markers) if i != index)
            cost += 0.5 * area * sum(_crosses(rect, segment) for segment in segments)
            cost += slot_index  # prefer earlier slots when all else is equal
            if best is None or cost < best[0]:
                best = (cost, dx, dy, ha, va, rect)
        _, dx, dy, ha, va, rect = best
        text.set_position((dx, dy))
        text.set_horizontalalignment(ha)
        text.set_verticalalignment(va)
        placed.append(rect)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area of the intersection of two (x0, y0, x1, y1) rectangles."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def _crosses(rect: tuple[float, float, float, float], segment: tuple[float, float, float, float]) -> bool:
    """Whether a horizontal or vertical segment (x0, y0, x1, y1) passes through the rectangle (x0, y0, x1, y1)."""
    x0, x1 = sorted((segment[0], segment[2]))
    y0, y1 = sorted((segment[1], segment[3]))
    return x0 < rect[2] and x1 > rect[0] and y0 < rect[3] and y1 > rect[1]
