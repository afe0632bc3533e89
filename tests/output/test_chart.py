"""The charts of an output's weights: the text chart, the card's hand-written SVG, and the plot of many outputs."""

import os
import xml.etree.ElementTree as ET

import pytest

from bema_offline.output import card
from bema_offline.output.chart import CHART_SVG, card_chart, source_name, weights_bar_chart, weights_svg

SVG = "{http://www.w3.org/2000/svg}"
WEIGHTS = {0: -0.039178, 20: 0.065279, 40: 0.058893, 60: 0.52, 80: 0.395006}


def test_the_text_chart_is_the_one_the_card_prints(tmp_path):
    text = card.write_card(tmp_path, _record(WEIGHTS)).read_text()
    assert f"```\n{weights_bar_chart(WEIGHTS)}\n```" in text and f"]({CHART_SVG})" in text
    assert weights_bar_chart({0: -0.5, 10: 1.5}, width=6).splitlines() == [
        "             base -0.500000 --",
        "    checkpoint-10 +1.500000 ######",
    ]
    assert [source_name(s) for s in (0, 7)] == ["base", "checkpoint-7"]


def _record(weights: dict[int, float]) -> dict:
    return {
        "kind": "bema", "step": max(weights), "run_dir": "/runs/r", "steps": {"found": sorted(weights)[1:], "ignored": []},
        "effective_weights": [{"step": s, "weight": w} for s, w in weights.items()],
    }  # fmt: skip


def bars(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [rect for rect in root.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is not None]


def axis_y(svg: str) -> float:
    """The y of the horizontal black line (the zero axis)."""
    root = ET.fromstring(svg)
    lines = [line for line in root.iter(f"{SVG}line") if line.get("stroke") == "black" and line.get("y1") == line.get("y2")]
    assert len(lines) == 1
    return float(lines[0].get("y1"))


def test_the_svg_has_one_bar_per_source_with_negative_weights_below_the_axis():
    svg = weights_svg(WEIGHTS, title="BEMA at step 80: effective weights")
    root = ET.fromstring(svg)  # well-formed
    assert root.tag == f"{SVG}svg"
    drawn = bars(svg)
    assert [rect.find(f"{SVG}title").text for rect in drawn] == [f"{source_name(s)}: {w:+.6f}" for s, w in WEIGHTS.items()]
    zero = axis_y(svg)
    for rect, weight in zip(drawn, WEIGHTS.values()):
        top, height = float(rect.get("y")), float(rect.get("height"))
        if weight < 0:
            assert top == pytest.approx(zero, abs=0.11) and rect.get("fill") == "#c44e52"
        else:
            assert top + height == pytest.approx(zero, abs=0.11) and rect.get("fill") == "#3b75af"
    heights = [float(rect.get("height")) for rect in drawn]
    assert heights[3] / heights[4] == pytest.approx(0.52 / 0.395006, rel=0.01)  # bars are to scale
    texts = [text.text for text in root.iter(f"{SVG}text")]
    assert "effective weight" in texts and "source (base, then checkpoint step)" in texts
    assert "BEMA at step 80: effective weights" in texts and {"base", "20", "80"} <= set(texts)


def test_the_svg_is_deterministic_and_escapes_its_title():
    title = 'config <a&b> "x"'
    assert weights_svg(WEIGHTS, title=title) == weights_svg(dict(reversed(list(WEIGHTS.items()))), title=title)
    root = ET.fromstring(weights_svg(WEIGHTS, title=title))
    assert root.find(f"{SVG}title").text == title


@pytest.mark.parametrize("weights", [{100: 1.0}, {0: -2.0, 100: 3.0}, {s: 1 / 500 for s in range(1, 501)}, {5: 1e-9, 6: 1.0}])
def test_the_svg_copes_with_any_weights(weights):
    svg = weights_svg(weights, title="t")
    assert len(bars(svg)) == len(weights)
    labels = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]
    assert sum(1 for label in labels if label.isdigit() or label == "base") <= 25  # at most 24 source labels
    width = float(ET.fromstring(svg).get("width"))
    assert 400 <= width <= 1000


def test_card_chart_writes_the_svg_and_returns_the_cards_markdown(tmp_path):
    markdown = card_chart(tmp_path, WEIGHTS, title="BEMA at step 80")
    assert (tmp_path / CHART_SVG).read_text() == weights_svg(WEIGHTS, title="BEMA at step 80")
    assert markdown.startswith(f"![effective weight of each source]({CHART_SVG})\n")
    assert f"```\n{weights_bar_chart(WEIGHTS)}\n```" in markdown
    card_chart(tmp_path, {0: 1.0}, title="again")  # a second render replaces the picture
    assert len(bars((tmp_path / CHART_SVG).read_text())) == 1
    assert sorted(os.listdir(tmp_path)) == [CHART_SVG]  # and leaves nothing else behind


def test_card_chart_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / CHART_SVG).symlink_to(victim)
    card_chart(folder, WEIGHTS, title="t")
    assert victim.read_bytes() == b"precious"
    assert not (folder / CHART_SVG).is_symlink() and (folder / CHART_SVG).read_text().startswith("<svg")
