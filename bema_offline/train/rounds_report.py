"""The report of an iterative run: the rounds table (`rounds.md`, stdout, the Hub card) and `rounds.png`.

Both are drawn from the `rounds.json` record alone, so they can be redrawn at any time, and show whatever metrics the
per-round evaluation returned (see `rounds_eval`): a table with a row per round and model (the reference, the last
checkpoint, the average) and a column per metric, and a panel per metric in the plot.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..eval.leaderboard import format_number
from ..output.card import card_metadata, metadata_yaml
from ..output.hub import redacted_paths

TABLE_FILE = "rounds.md"
PLOT_FILE = "rounds.png"
PLOT_COLUMNS = 3  # panels per row of rounds.png


def _short(path: str, workdir: Path, base: str) -> str:
    if path == base:
        return "base"
    try:
        return Path(path).relative_to(workdir).as_posix()
    except ValueError:
        return path


def average_title(entry: dict) -> str:
    """How tables name a round's average: BEMA, EMA, or the method's label (uniform-last4, power-ema-sigma0.1)."""
    average = entry["average"]
    label = average.get("label") or average.get("kind", "average")  # (the first rounds.json files had no label)
    return label.upper() if label in ("bema", "ema", "dema", "ouema") else label


def evaluated_rounds(record: dict) -> list[dict]:
    """The rounds evaluated with the same data and settings as the first one (a rerun with other eval data
    evaluates them all again, one after the other)."""
    evaluated = [entry for entry in record["rounds"] if "eval" in entry]
    return [entry for entry in evaluated if entry["eval"].get("key") == evaluated[0]["eval"].get("key")] if evaluated else []


def _metric_names(entry: dict) -> list[str]:
    return list(entry["eval"].get("metrics") or next(iter(entry["eval"]["scores"].values())))


def _higher_is_better(entry: dict, metric: str) -> bool | None:
    info = (entry["eval"].get("metrics") or {}).get(metric)
    return info["higher_is_better"] if info else None


def _arrow(entry: dict, metric: str) -> str:
    return {True: " ↑", False: " ↓", None: ""}[_higher_is_better(entry, metric)]


def _direction(entry: dict, metric: str) -> str:
    return {True: " (higher is better)", False: " (lower is better)", None: ""}[_higher_is_better(entry, metric)]


def _number(value: float | str | None) -> float:
    """A score as rounds.json holds it (non-finite numbers as "NaN", "Infinity") as a float."""
    if value is None:
        return math.nan
    return float(value.replace("Infinity", "inf")) if isinstance(value, str) else float(value)


def lora_text(lora: dict) -> str:
    """A LoRA plan as one phrase: `r=16, lora_alpha=32, lora_dropout=0.05, target_modules=q_proj,v_proj` and any
    other setting that differs from peft's defaults."""

    def shown(value: object) -> str:
        if value is None:
            return "peft's default"
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return ", ".join(f"{key}={shown(value)}" for key, value in lora.items())


def rounds_table(record: dict, workdir: Path) -> str:
    """The rounds as Markdown tables: what each round trained and wrote, then the evaluation (a row per round and
    model, a column per metric)."""
    base = record["plan"]["base_model"]["path"]
    lora = record["plan"].get("lora")
    adapter = f"; each round trains a LoRA adapter, {lora_text(lora)}, merged into the round's models" if lora else ""
    lines = [
        f"Rounds of iterative DPO (base model: {base}{adapter})",
        "",
        "| round | reference | policy start | data | steps | checkpoints | average |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in record["rounds"]:
        lines.append(
            f"| {entry['round']} | {_short(entry['reference']['path'], workdir, base)} | {_short(entry['policy']['path'], workdir, base)} "
            f"| {Path(entry['dataset']['path']).name} | {entry['training']['global_step']} "
            f"| {', '.join(map(str, entry['training']['checkpoints']))} | {_short(entry['average']['path'], workdir, base)} |"
        )
    evaluated = evaluated_rounds(record)
    if evaluated:
        first = evaluated[0]
        metrics = _metric_names(first)
        titles = {"reference": "reference", "last checkpoint": "last checkpoint", "average": average_title(evaluated[-1])}
        lines += ["", f"Evaluation: {_eval_description(first)} (↑ higher is better, ↓ lower is better)", "",
                  "| round | model | " + " | ".join(f"{m.replace('_', ' ')}{_arrow(first, m)}" for m in metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]  # fmt: skip
        for entry in evaluated:
            for role, title in titles.items():
                scores = entry["eval"]["scores"][role]
                lines.append(f"| {entry['round']} | {title} | " + " | ".join(format_number(scores.get(m)) for m in metrics) + " |")
    return "\n".join(lines)


def _eval_description(entry: dict) -> str:
    return entry["eval"].get("description") or entry["eval"].get("metric", "")  # ("metric": the first rounds.json files)


def write_rounds_table(record: dict, workdir: Path) -> None:
    """Write `rounds.md` and, when the rounds were scored, `rounds.png` (with matplotlib; else a note in rounds.md)."""
    text = rounds_table(record, workdir) + "\n"
    if evaluated_rounds(record):
        if rounds_png(record, workdir / PLOT_FILE):
            text += f"\n![metrics per round]({PLOT_FILE})\n"
        else:
            text += "\n(rounds.png needs matplotlib: pip install 'bema-offline[plot]')\n"
    temporary = workdir / f".{TABLE_FILE}.tmp"
    temporary.write_text(text)
    os.replace(temporary, workdir / TABLE_FILE)


def rounds_png(record: dict, path: Path) -> bool:
    """Each metric per round: the average, the last checkpoint, and the reference's own score.

    Returns:
        `bool`: False, writing nothing, when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    evaluated = evaluated_rounds(record)
    metrics = _metric_names(evaluated[0])
    columns = min(len(metrics), PLOT_COLUMNS)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows + 0.6), dpi=100)
    FigureCanvasAgg(figure)
    rounds = [entry["round"] for entry in evaluated]
    styles = {
        "average": dict(color="#3b75af", marker="o", label=average_title(evaluated[-1])),
        "last checkpoint": dict(color="#c44e52", marker="s", label="last checkpoint"),
        "reference": dict(color="gray", marker="^", linestyle="--", label="reference"),
    }
    for index, metric in enumerate(metrics, 1):
        axes = figure.add_subplot(rows, columns, index)
        for role, style in styles.items():
            axes.plot(rounds, [_number(entry["eval"]["scores"][role].get(metric)) for entry in evaluated], **style)
        axes.set_xticks(rounds)
        axes.set_xlabel("round")
        axes.set_title(f"{metric.replace('_', ' ')}{_direction(evaluated[0], metric)}", fontsize=10)
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle(_eval_description(evaluated[0]), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()))  # room for the title
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)
    return True


def rounds_card(record: dict, workdir: Path, *, repo_id: str) -> str:
    """The model card of the main branch: the rounds table, and how to load each round's branch (local paths shown
    relative to the work folder, or by their last name)."""
    metadata = card_metadata({"training": {"tags": ["dpo", "iterative-dpo"]}})
    last = record["rounds"][-1]["round"]
    card = f"""---
{metadata_yaml(metadata)}
---

# Iterative DPO rounds

Each round of this run is on its own branch, `round-K`: the round's {average_title(record['rounds'][-1])}, made by
[bema-offline](https://pypi.org/project/bema-offline/) from the round's checkpoints (its own card gives each
checkpoint's effective weight).

{rounds_table(record, workdir)}

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="round-{last}")
```
"""
    return redacted_paths(card, workdir)  # the Hub gets no local path: the work folder's own names, or last names
