"""Charts of an output's effective weights: a text chart (terminal, `--dry-run`, the card), a small SVG bar chart
written by hand for the model card, and a matplotlib figure of many outputs' profiles for `bema-offline weights
--plot`.

The card's picture is written without matplotlib (whose import alone costs most of a second of every run): a
deterministic SVG, the same bytes for the same weights, that the Hub and any Markdown viewer show beside the card.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

from ..errors import UsageError
from ..files import replace_file

BASE_STEP = 0
CHART_SVG = "effective_weights.svg"
POSITIVE, NEGATIVE = "#3b75af", "#c44e52"


def source_name(step: int) -> str:
    """`base` for step 0 (the model before training), else `checkpoint-N`."""
    return "base" if step == BASE_STEP else f"checkpoint-{step}"


def weights_bar_chart(weights: Mapping[int, float], *, width: int = 40) -> str:
    """Each source's effective weight as a line of text with a bar (negative weights drawn with '-').

    Example:

    ```python
    >>> print(weights_bar_chart({0: -0.25, 100: 1.25}, width=10))
                 base -0.250000 --
       checkpoint-100 +1.250000 ##########
    ```
    """
    largest = max((abs(w) for w in weights.values()), default=1.0) or 1.0
    lines = []
    for step, weight in sorted(weights.items()):
        bar = ("#" if weight >= 0 else "-") * round(abs(weight) / largest * width)
        lines.append(f"{source_name(step):>17} {weight:+.6f} {bar}")
    return "\n".join(lines)


def card_chart(folder: str | Path, weights: Mapping[int, float], *, title: str) -> str:
    """Write the chart of an output's weights into its folder (`effective_weights.svg`) and return the card's
    Markdown for it: the picture, then the same numbers as a text chart. The one call a model card needs.

    The SVG replaces any earlier one without following a link at its name (`files.replace_file`).

    Args:
        folder (`str | Path`): the output folder (or its staging folder).
        weights (`Mapping[int, float]`): source step (0: the base model) -> effective weight.
        title (`str`): the picture's title, e.g. "BEMA at step 800: effective weights".

    Returns:
        `str`: Markdown that shows `effective_weights.svg`, and the text chart in a code block.
    """
    folder = Path(folder)
    replace_file(folder / CHART_SVG, weights_svg(weights, title=title).encode("utf-8"))
    return f"![effective weight of each source]({CHART_SVG})\n\n```\n{weights_bar_chart(weights)}\n```"


def weights_svg(weights: Mapping[int, float], *, title: str) -> str:
    """An SVG bar chart of the weights: one bar per source in step order, labelled axes, negative weights below the
    axis. Deterministic: the same weights and title give the same bytes."""
    steps = sorted(weights)
    values = [float(weights[s]) for s in steps]
    plot_width = min(880, max(360, 16 * len(steps)))
    left, right, top, bottom = 78, 16, 34, 62
    width, height = left + plot_width + right, 300
    plot_height = height - top - bottom
    low, high, ticks = _ticks(min([0.0, *values]), max([0.0, *values]))

    def y(value: float) -> float:
        return top + (high - value) / (high - low) * plot_height

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
    ]
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9)) if len(ticks) > 1 else 2
    for tick in ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e4e4e4"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{_number(tick, decimals)}</text>'
        )
    band = plot_width / max(1, len(steps))
    for i, (step, value) in enumerate(zip(steps, values)):
        x = left + i * band + band * 0.15
        top_y, bottom_y = sorted((y(value), y(0.0)))
        colour = POSITIVE if value >= 0 else NEGATIVE
        parts.append(
            f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{band * 0.7:.1f}" height="{bottom_y - top_y:.1f}" fill="{colour}">'
            f"<title>{escape(source_name(step))}: {value:+.6f}</title></rect>"
        )
    every = -(-len(steps) // 24)  # at most 24 labels
    for i in range(0, len(steps), every):
        x = left + (i + 0.5) * band
        label = "base" if steps[i] == BASE_STEP else str(steps[i])
        parts.append(
            f'<text x="{x:.1f}" y="{top + plot_height + 14}" text-anchor="end" '
            f'transform="rotate(-40 {x:.1f} {top + plot_height + 14})">{escape(label)}</text>'
        )
    parts += [
        f'<line x1="{left}" x2="{left + plot_width}" y1="{y(0.0):.1f}" y2="{y(0.0):.1f}" stroke="black"/>',
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_height}" stroke="black"/>',
        f'<text x="{left + plot_width / 2:.1f}" y="{height - 8}" text-anchor="middle">source (base, then checkpoint step)</text>',
        f'<text x="16" y="{top + plot_height / 2:.1f}" text-anchor="middle" transform="rotate(-90 16 {top + plot_height / 2:.1f})">'
        "effective weight</text>",
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def plot_weights(outputs: Mapping[str, Mapping[int, float]], path: str | Path, *, title: str) -> Path:
    """Draw every output's weight profile on one figure (a PNG, or any format matplotlib knows by the suffix):
    weight against training step, the base model at step 0, one labelled line per output.

    Raises:
        `UsageError`: matplotlib is not installed (it is in the `plot` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'bema-offline[plot]'") from None
    path = Path(path)
    figure = Figure(figsize=(9, 4.8), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    markers = "os^vD<>ph*"
    every_source = sorted({step for weights in outputs.values() for step in weights})
    position = {step: i for i, step in enumerate(every_source)}
    for index, (label, weights) in enumerate(outputs.items()):
        steps = sorted(weights)
        # a line joins neighbouring sources only: between two that are not, nothing would be drawn honestly
        ys = [weights[steps[0]]]
        xs = [steps[0]]
        for previous, step in zip(steps, steps[1:]):
            if position[step] != position[previous] + 1:
                xs.append(math.nan)
                ys.append(math.nan)
            xs.append(step)
            ys.append(weights[step])
        axes.plot(
            xs, ys, marker=markers[index % len(markers)], markersize=4, linewidth=1.2, label=label or "output",
            color=f"C{index % 10}",
        )
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("training step (0: the base model)")
    axes.set_ylabel("effective weight")
    axes.set_title(title, fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=1 + len(outputs) // 12)
    figure.tight_layout()
    try:
        figure.savefig(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--plot {path}: cannot write it ({getattr(e, 'strerror', None) or e})") from e
    return path


def _ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """A range that holds [low, high] and 0, with 3 to 8 round ticks (1, 2 or 5 times a power of ten apart)."""
    if high - low < 1e-12:
        high = low + 1.0
    raw = (high - low) / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    ticks = [k * step for k in range(first, last + 1)]
    return ticks[0], ticks[-1], [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}".replace("-", "−") if value < 0 else f"{value:.{decimals}f}"



__all__ = ["CHART_SVG", "card_chart", "plot_weights", "source_name", "weights_bar_chart", "weights_svg"]
