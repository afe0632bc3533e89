"""`eval.png`: the ranking metric against the swept parameters, and the winner's effective weights beside it.

- One swept numeric parameter (`ema_power`, or the step with `--every-update`): the metric against it, one line per
  value of any other swept setting (method, kind), the baselines as dashed horizontal lines.
- Two: a heatmap of the metric over the grid, each cell annotated, the winner's outlined; the baselines are marked on
  the colour bar and named under the title.
- Otherwise (folders without provenance, larger sweeps): the models as horizontal bars, best at the top.

matplotlib (the `plot` extra) is imported here only; without it there is no picture.
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

from ..sources.run import BASE_STEP
from .leaderboard import format_number
from .report import EvalReport, Ranked

WINNER_COLOR = "#c44e52"
AVERAGE_COLOR = "#3b75af"
BASELINE_COLOR = "#7f7f7f"
NEGATIVE_COLOR = "#dd8452"


def draw_report(report: EvalReport):
    """Draw the report's figure.

    Returns:
        `matplotlib.figure.Figure` or None: the figure (not yet saved), or None when matplotlib is not installed.

    Example:

    ```python
    >>> figure = draw_report(report)
    >>> [axes.get_xlabel() for axes in figure.axes][:2]
    ['ema_power', 'source (base, then checkpoint step)']
    ```
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    weights = report.winner.candidate.record.effective_weights if report.winner and report.winner.candidate.record else {}
    figure = Figure(figsize=(12.0 if weights else 7.0, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 2, width_ratios=[1.25, 1.0]) if weights else figure.add_gridspec(1, 1)
    axes = figure.add_subplot(grid[0, 0])
    averages = [r for r in report.ranked if r.candidate.record is not None and _finite(r, report.metric)]
    numeric = [p for p in report.swept if _numeric(averages, p)]
    others = [p for p in report.swept if p not in numeric]
    if len(numeric) == 1 and averages:
        _lines(figure, axes, report, averages, numeric[0], others)
    elif len(numeric) == 2 and not others and _one_per_cell(averages, numeric):
        _heatmap(figure, axes, report, averages, numeric)
    else:
        _bars(axes, report)
    data = f" on {Path(report.data['path']).name}" if report.data else ""
    title = f"{report.metric}{data} ({'higher' if report.higher_is_better else 'lower'} is better)"
    baselines = _baselines(report)
    if baselines and axes.images:  # the heatmap shows no baseline cell: name them under the title
        title += "\nbaselines: " + ", ".join(f"{r.label} {format_number(r.metrics[report.metric])}" for r in baselines)
    axes.set_title(title, fontsize=10)
    if weights:
        _weights(figure.add_subplot(grid[0, 1]), report.winner, weights)
    figure.tight_layout()
    return figure


def _lines(figure, axes, report: EvalReport, averages: list[Ranked], parameter: str, others: list[str]) -> None:
    series: dict[tuple, list[Ranked]] = {}
    for r in averages:
        series.setdefault(tuple(_value(r, p) for p in others), []).append(r)
    for key, members in series.items():
        members.sort(key=lambda r: _value(r, parameter))
        label = ", ".join(f"{p}={v}" for p, v in zip(others, key)) or None
        axes.plot([_value(r, parameter) for r in members], [r.metrics[report.metric] for r in members],
                  marker="o", label=label)
    winner = report.winner
    if winner is not None and winner in averages:
        axes.plot([_value(winner, parameter)], [winner.metrics[report.metric]], marker="*", markersize=16,
                  color=WINNER_COLOR, linestyle="none", label=f"winner: {winner.label}")
    for index, r in enumerate(_baselines(report)):
        axes.axhline(r.metrics[report.metric], color=BASELINE_COLOR, linestyle=("--", ":", "-.")[index % 3],
                     linewidth=1.2, label=f"{r.label}: {format_number(r.metrics[report.metric])}")
    axes.set_xlabel(parameter)
    axes.set_ylabel(report.metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def _heatmap(figure, axes, report: EvalReport, averages: list[Ranked], parameters: list[str]) -> None:
    x_name, y_name = parameters
    xs = sorted({_value(r, x_name) for r in averages})
    ys = sorted({_value(r, y_name) for r in averages})
    cells = [[math.nan] * len(xs) for _ in ys]
    for r in averages:
        cells[ys.index(_value(r, y_name))][xs.index(_value(r, x_name))] = r.metrics[report.metric]
    image = axes.imshow(cells, origin="lower", aspect="auto", cmap="viridis" if report.higher_is_better else "viridis_r")
    axes.set_xticks(range(len(xs)), [str(x) for x in xs])
    axes.set_yticks(range(len(ys)), [str(y) for y in ys])
    for row in range(len(ys)):
        for column in range(len(xs)):
            value = cells[row][column]
            if math.isfinite(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # perceived brightness of the cell
                axes.text(column, row, format_number(value), ha="center", va="center", fontsize=8,
                          color="white" if dark else "black")
    winner = report.winner
    if winner is not None and winner in averages:
        from matplotlib.patches import Rectangle

        column, row = xs.index(_value(winner, x_name)), ys.index(_value(winner, y_name))
        axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=WINNER_COLOR, linewidth=3))
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label(report.metric)
    low, high = colorbar.ax.get_ylim()
    for r in _baselines(report):  # a baseline inside the colour range is a line on the colour bar
        if low <= r.metrics[report.metric] <= high:
            colorbar.ax.axhline(r.metrics[report.metric], color=BASELINE_COLOR, linewidth=2)
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)


def _bars(axes, report: EvalReport) -> None:
    shown = [r for r in report.ranked if _finite(r, report.metric)][:40]
    values = [r.metrics[report.metric] for r in shown]
    colors = [WINNER_COLOR if r is report.winner else BASELINE_COLOR if r.candidate.role == "baseline" else AVERAGE_COLOR
              for r in shown]
    positions = range(len(shown))
    axes.barh(list(positions), values, color=colors)
    for position, value in zip(positions, values):
        axes.text(value, position, f" {format_number(value)}", va="center", fontsize=7)
    axes.set_yticks(list(positions), [r.label for r in shown], fontsize=7)
    axes.invert_yaxis()  # the best at the top
    if values:  # zoom on the differences: losses of 1.36 and 1.39 drawn from 0 would look the same
        low, high = min(values), max(values)
        pad = (high - low) * 0.15 or max(abs(high) * 0.05, 1e-6)
        if low >= 0:
            axes.set_xlim(max(0.0, low - pad), high + pad)
        elif high <= 0:
            axes.set_xlim(low - pad, min(0.0, high + pad))
        else:
            axes.set_xlim(low - pad, high + pad)
    axes.set_xlabel(report.metric)
    axes.set_ylabel("model (best first)")
    axes.grid(alpha=0.3, axis="x")


def _weights(axes, winner: Ranked, weights: dict[int, float]) -> None:
    steps = sorted(weights)
    values = [weights[s] for s in steps]
    axes.bar(range(len(steps)), values, color=[AVERAGE_COLOR if v >= 0 else NEGATIVE_COLOR for v in values])
    axes.axhline(0.0, color="black", linewidth=0.8)
    every = -(-len(steps) // 20)  # at most 20 tick labels
    ticks = list(range(0, len(steps), every))
    axes.set_xticks(ticks, ["base" if steps[i] == BASE_STEP else str(steps[i]) for i in ticks], rotation=45, fontsize=8)
    axes.set_xlabel("source (base, then checkpoint step)")
    axes.set_ylabel("effective weight")
    axes.set_title(f"winner {winner.label}: effective weights", fontsize=10)
    axes.grid(alpha=0.3, axis="y")


def _baselines(report: EvalReport) -> list[Ranked]:
    return [r for r in report.ranked if r.candidate.role == "baseline" and _finite(r, report.metric)]


def _value(ranked: Ranked, parameter: str) -> object:
    record = ranked.candidate.record
    return {"method": record.method, **record.params, "step": record.step}.get(parameter)


def _numeric(averages: list[Ranked], parameter: str) -> bool:
    values = [_value(r, parameter) for r in averages]
    return bool(values) and all(isinstance(v, Real) and not isinstance(v, bool) for v in values)


def _one_per_cell(averages: list[Ranked], parameters: list[str]) -> bool:
    cells = [tuple(_value(r, p) for p in parameters) for r in averages]
    return len(cells) == len(set(cells))


def _finite(ranked: Ranked, metric: str) -> bool:
    value = ranked.metrics.get(metric)
    return value is not None and math.isfinite(value)
