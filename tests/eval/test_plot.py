"""eval.png: lines for one swept parameter, a heatmap for two, bars otherwise; labelled axes; a PNG that reads back."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
from eval_runs import DIRECTIONS
from eval_runs import fake_result as result
from PIL import Image

from bema_offline.eval.plot import draw_report
from bema_offline.eval.report import rank


def _labels(axes) -> tuple[str, str]:
    return axes.get_xlabel(), axes.get_ylabel()


def test_one_swept_parameter_is_a_line_with_the_baselines() -> None:
    results = [result(f"ema_power={e}", params={"ema_power": e, "lag": 10}, loss=2 - e) for e in (0.3, 0.5, 0.7)]
    results += [result("checkpoint-12 (last)", "baseline", loss=1.5), result("base", "baseline", loss=3.0)]
    figure = draw_report(rank(results, metric="loss", directions=DIRECTIONS))
    metric_axes, weight_axes = figure.axes
    assert _labels(metric_axes) == ("ema_power", "loss")
    assert _labels(weight_axes) == ("source (base, then checkpoint step)", "effective weight")
    lines = metric_axes.get_lines()
    assert list(lines[0].get_xdata()) == [0.3, 0.5, 0.7] and list(lines[0].get_ydata()) == pytest.approx([1.7, 1.5, 1.3])
    legend = [text.get_text() for text in metric_axes.get_legend().get_texts()]
    assert "winner: ema_power=0.7" in legend and "checkpoint-12 (last): 1.500000" in legend and "base: 3.000000" in legend
    assert [p.get_height() for p in weight_axes.patches] == [-0.5, 1.5]
    assert "loss" in metric_axes.get_title() and "winner ema_power=0.7" in weight_axes.get_title()


def test_two_swept_parameters_are_a_heatmap() -> None:
    results = [result(f"e{e},b{b}", params={"ema_power": e, "bias_power": b}, reward_accuracy=e + b, reward_margin=0.0)
               for e in (0.3, 0.5, 0.7) for b in (0.1, 0.2)]
    results.append(result("base", "baseline", reward_accuracy=0.5, reward_margin=0.0))
    figure = draw_report(rank(results, metric="reward_accuracy", directions=DIRECTIONS))
    metric_axes, colorbar_axes, weight_axes = figure.axes
    assert _labels(metric_axes) == ("ema_power", "bias_power")
    assert colorbar_axes.get_ylabel() == "reward_accuracy"
    (image,) = metric_axes.images
    assert image.get_array().shape == (2, 3)  # bias_power rows × ema_power columns
    assert float(image.get_array()[1, 2]) == pytest.approx(0.9)  # ema_power 0.7, bias_power 0.2, the winner
    assert "baselines: base 0.500000" in metric_axes.get_title()
    assert sorted(t.get_text() for t in metric_axes.texts)[0] == "0.400000"
    assert weight_axes.get_ylabel() == "effective weight"


def test_folders_without_provenance_are_bars(tmp_path: Path) -> None:
    results = [result(name, "model", loss=loss) for name, loss in [("a", 1.2), ("b", 1.1), ("c", 1.4)]]
    report = rank(results, metric="loss", directions=DIRECTIONS)
    figure = draw_report(report)
    (axes,) = figure.axes  # no winner record: no weights panel
    assert _labels(axes) == ("loss", "model (best first)")
    assert [t.get_text() for t in axes.get_yticklabels()] == ["b", "a", "c"]
    written = report.write(tmp_path)
    assert written[-1] == tmp_path / "eval.png"
    with Image.open(written[-1]) as png:
        assert png.format == "PNG" and png.size == (700, 460)
    assert matplotlib.image.imread(written[-1]).shape[:2] == (460, 700)
