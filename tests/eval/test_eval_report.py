"""Ranking: directions, shared ranks, ties and NaN always reported, baselines never the winner; eval.json and eval.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

from eval_runs import DIRECTIONS
from eval_runs import fake_result as result

from bema_offline.eval.report import rank


def test_lower_is_better_with_shared_ranks_and_a_nan_listed_last() -> None:
    results = [result("a", loss=2.0), result("b", loss=1.0), result("nan", loss=math.nan), result("c", loss=2.0)]
    report = rank(results, metric="loss", directions=DIRECTIONS)
    assert [(r.label, r.rank) for r in report.ranked] == [("b", 1), ("a", 2), ("c", 2), ("nan", None)]
    assert report.winner.label == "b"
    assert report.ties == ["a, c share loss = 2.000000"]
    assert report.notes == ["loss is NaN for nan (non-finite outputs or missing); not ranked, never selected"]
    table = report.table()
    assert "2=  a" in table and "-  nan" in table and "NaN" in table and "tie: a, c share loss" in table


def test_an_accuracy_tie_is_broken_by_the_margin_and_said() -> None:
    results = [result("a", reward_accuracy=0.75, reward_margin=0.1), result("b", reward_accuracy=0.75, reward_margin=0.3),
               result("c", reward_accuracy=0.5, reward_margin=0.9)]
    report = rank(results, metric="reward_accuracy", directions=DIRECTIONS)
    assert [r.label for r in report.ranked] == ["b", "a", "c"] and [r.rank for r in report.ranked] == [1, 2, 3]
    assert report.ties == ["b, a share reward_accuracy = 0.750000; reward_margin orders them"]


def test_an_exact_tie_for_the_win_is_reported_with_the_choice() -> None:
    report = rank([result("x", loss=1.5), result("y", loss=1.5)], metric="loss", directions=DIRECTIONS)
    assert report.winner.label == "x"
    assert report.ties == ["x, y share loss = 1.500000; exact tie for the win: x was taken as the first listed"]


def test_a_baseline_is_ranked_but_never_the_winner() -> None:
    results = [result("bema", loss=1.4), result("checkpoint-240 (last)", "baseline", loss=1.3), result("base", "baseline", loss=3.9)]
    report = rank(results, metric="loss", directions=DIRECTIONS)
    assert [r.label for r in report.ranked] == ["checkpoint-240 (last)", "bema", "base"]
    assert report.winner.label == "bema"
    assert report.notes == ["the baseline checkpoint-240 (last) ranks above every average (loss 1.300000 vs 1.400000)"]


def test_no_winner_when_every_average_is_nan() -> None:
    report = rank([result("a", loss=math.nan), result("base", "baseline", loss=2.0)], metric="loss", directions=DIRECTIONS)
    assert report.winner is None
    assert "no model that is not a baseline has a loss: there is no winner" in report.notes


def test_swept_parameters_are_those_that_differ() -> None:
    results = [result(f"e{e},b{b}", params={"ema_power": e, "bias_power": b, "lag": 10}, loss=e + b)
               for e in (0.3, 0.7) for b in (0.1, 0.2)]
    assert rank(results, metric="loss", directions=DIRECTIONS).swept == ["ema_power", "bias_power"]


def test_json_is_strict_and_markdown_is_a_table(tmp_path: Path) -> None:
    report = rank([result("a", loss=1.0, perplexity=math.e), result("b", loss=math.inf, perplexity=math.nan)],
                  metric="loss", directions=DIRECTIONS, data={"path": "/d/heldout.jsonl", "kind": "text", "rows": 3,
                                                             "scored_tokens": 30, "split": None})
    written = report.write(tmp_path, plot=False)
    assert [p.name for p in written] == ["eval.json", "eval.md"]
    record = json.loads((tmp_path / "eval.json").read_text(), parse_constant=lambda name: 1 / 0)  # no NaN tokens
    assert record["winner"] == "a" and record["results"][1]["metrics"] == {"loss": "Infinity", "perplexity": "NaN"}
    assert record["results"][0]["params"] == {} and record["results"][0]["method"] == "bema"
    markdown = (tmp_path / "eval.md").read_text()
    assert "| 1 | **`a`** | 1.000000 | 2.718282 |" in markdown and "| 2 | `b` | inf | NaN |" in markdown
    assert "Data: `heldout.jsonl` (text, 3 rows, 30 scored tokens)." in markdown
    assert not list(tmp_path.glob(".*"))  # no temporary file left
