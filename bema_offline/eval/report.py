"""Rank evaluated models, and write the ranking as a table, `eval.json` and `eval.md`.

Ranks are competition ranks (1, 2, 2, 4): models whose ranking values are equal share a rank. A tie on the ranking
metric is always reported, with what decided it (`reward_margin` after `reward_accuracy`) or, for an exact tie, that
the model listed first was taken. A NaN metric is never ranked: the model is listed last without a rank, and a note
says so. The winner is the best-ranked model that is not a baseline.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..files import replace_file
from .candidates import Candidate
from .leaderboard import format_number, json_number, leaderboard_markdown
from .metrics import TIE_BREAK

JSON_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"
PNG_FILE = "eval.png"


@dataclass(frozen=True)
class Result:
    """One model's metrics."""

    candidate: Candidate
    metrics: dict[str, float]
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return self.candidate.label


@dataclass(frozen=True)
class Ranked:
    """A result and its rank (None when its ranking metric is NaN)."""

    rank: int | None
    result: Result

    @property
    def label(self) -> str:
        return self.result.candidate.label

    @property
    def candidate(self) -> Candidate:
        return self.result.candidate

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.metrics


@dataclass(frozen=True)
class EvalReport:
    """The ranking of an evaluation.

    Args:
        metric (`str`): the metric ranked by.
        higher_is_better (`bool`): its direction.
        ranked (`list[Ranked]`): best first; NaN metrics last, unranked.
        winner (`Ranked`, *optional*): the best-ranked model that is not a baseline; None when every one is NaN.
        ties (`list[str]`): one line per group of models that tie on the ranking metric.
        notes (`list[str]`): NaN metrics, a baseline that beats every average, rows dropped.
        data (`dict`, *optional*): the data evaluated on (path, kind, rows, scored tokens).
        settings (`dict`): device, dtype, batch size, reference model...
        sweep_dir (`Path`, *optional*): the sweep folder evaluated.
        swept (`list[str]`): the parameters whose values differ between the averages.
    """

    metric: str
    higher_is_better: bool
    ranked: list[Ranked]
    winner: Ranked | None
    ties: list[str]
    notes: list[str]
    data: dict | None
    settings: dict
    sweep_dir: Path | None = None
    swept: list[str] = field(default_factory=list)

    @property
    def metric_names(self) -> list[str]:
        """Every metric computed, the ranking metric first."""
        names = dict.fromkeys([self.metric])
        for ranked in self.ranked:
            names.update(dict.fromkeys(ranked.metrics))
        return list(names)

    def to_dict(self) -> dict:
        """The report as `eval.json` holds it; non-finite numbers are written as "NaN", "Infinity", "-Infinity"."""
        return {
            "tool": "bema-offline",
            "version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "winner": self.winner.label if self.winner else None,
            "data": self.data,
            "settings": self.settings,
            "swept": self.swept,
            "ties": self.ties,
            "notes": self.notes,
            "results": [
                {
                    "rank": r.rank,
                    "label": r.label,
                    "role": r.candidate.role,
                    "source": _absolute(r.candidate.source),
                    "method": r.candidate.record.method if r.candidate.record else None,
                    "step": r.candidate.record.step if r.candidate.record else None,
                    "params": r.candidate.record.params if r.candidate.record else {},
                    "metrics": {name: json_number(value) for name, value in r.metrics.items()},
                    "seconds": round(r.result.seconds, 3),
                }
                for r in self.ranked
            ],
        }

    def table(self) -> str:
        """The ranking as aligned text, for the terminal."""
        names = self.metric_names
        rows = [["rank", "model", *names]]
        for r in self.ranked:
            marker = " *" if self.winner is not None and r is self.winner else ""
            label = r.label + (" [baseline]" if r.candidate.role == "baseline" else "") + marker
            rows.append([_rank_text(r, self.ranked), label, *(format_number(r.metrics.get(n)) for n in names)])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                 for row in rows]
        direction = "higher is better" if self.higher_is_better else "lower is better"
        lines.insert(0, f"ranked by {self.metric} ({direction}); * the winner")
        return "\n".join(lines + [f"tie: {line}" for line in self.ties] + [f"note: {line}" for line in self.notes])

    def markdown(self) -> str:
        """The leaderboard as Markdown (`eval.md`; also the end of `best/`'s card)."""
        return leaderboard_markdown(self.to_dict())

    def write(self, folder: str | Path, *, plot: bool = True) -> list[Path]:
        """Write `eval.json`, `eval.md` and (with matplotlib, unless `plot` is False) `eval.png` into `folder`, each
        replaced atomically. Returns the paths written."""
        folder = Path(folder)
        written = [
            _write_atomic(folder / JSON_FILE, (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode()),
            _write_atomic(folder / MARKDOWN_FILE, self.markdown().encode()),
        ]
        if plot:
            from .plot import draw_report

            figure = draw_report(self)
            if figure is not None:
                image = io.BytesIO()
                figure.savefig(image, format="png")
                written.append(_write_atomic(folder / PNG_FILE, image.getvalue()))
        return written


def rank(results: list[Result], *, metric: str, directions: dict[str, bool], data: dict | None = None,
         settings: dict | None = None, sweep_dir: Path | None = None) -> EvalReport:
    """Rank results by `metric` (its direction from `directions`), breaking ties as `TIE_BREAK` says.

    Example:

    ```python
    >>> report = rank(results, metric="loss", directions={"loss": False})
    >>> report.winner.label, report.ties
    ('bema', [])
    ```
    """
    higher = directions[metric]
    tie_break = TIE_BREAK.get(metric)
    keys = {id(r): _key(r, metric, tie_break, directions) for r in results}
    ordered = sorted(results, key=lambda r: keys[id(r)])  # stable: equal keys keep the order given
    ranked, position = [], 0
    for index, result in enumerate(ordered):
        if _is_nan(result.metrics.get(metric)):
            ranked.append(Ranked(None, result))
            continue
        if index == 0 or keys[id(result)] != keys[id(ordered[index - 1])]:
            position = index + 1
        ranked.append(Ranked(position, result))
    winner = next((r for r in ranked if r.rank is not None and r.candidate.role != "baseline"), None)
    ties = _ties(ranked, metric, tie_break, winner)
    notes = _notes(ranked, metric, winner, data)
    return EvalReport(metric=metric, higher_is_better=higher, ranked=ranked, winner=winner, ties=ties, notes=notes,
                      data=data, settings=settings or {}, sweep_dir=sweep_dir, swept=swept_parameters(results))


def swept_parameters(results: list[Result]) -> list[str]:
    """The parameters (and method, kind or step) whose values differ between the averages, in record order."""
    rows = [_parameters(r.candidate) for r in results if r.candidate.record is not None]
    names = dict.fromkeys(name for row in rows for name in row)
    return [name for name in names if len({repr(row.get(name)) for row in rows}) > 1]


def _parameters(candidate: Candidate) -> dict[str, object]:
    record = candidate.record
    return {"method": record.method, **record.params, "step": record.step}


def _key(result: Result, metric: str, tie_break: str | None, directions: dict[str, bool]) -> tuple:
    def part(name: str) -> tuple:
        value = result.metrics.get(name)
        if _is_nan(value):
            return (1, 0.0)
        return (0, -value if directions[name] else value)

    return part(metric) + (part(tie_break) if tie_break else ())


def _ties(ranked: list[Ranked], metric: str, tie_break: str | None, winner: Ranked | None) -> list[str]:
    groups: dict[float, list[Ranked]] = {}
    for r in ranked:
        if r.rank is not None:
            groups.setdefault(r.metrics[metric], []).append(r)
    lines = []
    for value, members in groups.items():
        if len(members) < 2:
            continue
        names = ", ".join(m.label for m in members)
        line = f"{names} share {metric} = {format_number(value)}"
        decided = tie_break is not None and len({m.rank for m in members}) == len(members)
        if tie_break is not None:
            line += f"; {tie_break} orders them" + ("" if decided else " only in part")
        if winner is not None and winner in members:
            exact = [m for m in members if m.rank == winner.rank and m.candidate.role != "baseline"]
            if len(exact) > 1:
                line += f"; exact tie for the win: {winner.label} was taken as the first listed"
        lines.append(line)
    return lines


def _notes(ranked: list[Ranked], metric: str, winner: Ranked | None, data: dict | None) -> list[str]:
    notes = []
    unranked = [r.label for r in ranked if r.rank is None]
    if unranked:
        notes.append(f"{metric} is NaN for {', '.join(unranked)} (non-finite outputs or missing); not ranked, never selected")
    if winner is None:
        notes.append(f"no model that is not a baseline has a {metric}: there is no winner")
    else:
        ahead = [r for r in ranked if r.rank is not None and r.rank < winner.rank and r.candidate.role == "baseline"]
        for r in ahead:
            notes.append(f"the baseline {r.label} ranks above every average ({metric} {format_number(r.metrics[metric])} "
                         f"vs {format_number(winner.metrics[metric])})")
    if data and data.get("dropped_rows"):
        notes.append(f"{data['dropped_rows']} rows of the data had no token to score within max_length and were left out")
    if data and data.get("truncated_sequences"):
        notes.append(f"{data['truncated_sequences']} sequences were cut to max_length tokens")
    return notes


def _rank_text(ranked: Ranked, everyone: list[Ranked]) -> str:
    if ranked.rank is None:
        return "-"
    shared = sum(r.rank == ranked.rank for r in everyone) > 1
    return f"{ranked.rank}=" if shared else str(ranked.rank)


def _is_nan(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _absolute(source: str) -> str:
    """A local folder as an absolute path (the report may be read from elsewhere); a Hub id as it is."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def _write_atomic(path: Path, content: bytes) -> Path:
    temporary = path.parent / f".{path.name}.tmp"
    replace_file(temporary, content)  # (created anew: a link or a leftover there is removed by name, never written through)
    os.replace(temporary, path)
    return path
