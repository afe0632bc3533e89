"""The report of an iterative run: the rounds table (`rounds.md`, stdout, the Hub card) and `rounds.png`.

Both are drawn from the `rounds.json` record alone, so they can be redrawn at any time. The metric tables and the
plot take whatever metrics the per-round scorer returned (see `iterate.make_scorer`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..output.card import card_metadata, metadata_yaml

TABLE_FILE = "rounds.md"
PLOT_FILE = "rounds.png"


def _short(path: str, workdir: Path, base: str) -> str:
    if path == base:
        return "base"
    try:
        return Path(path).relative_to(workdir).as_posix()
    except ValueError:
        return path


def rounds_table(record: dict, workdir: Path) -> str:
    """The rounds as Markdown tables: what each round trained and wrote, then each evaluation metric per round."""
    base = record["plan"]["base_model"]["path"]
    lines = [
        f"Rounds of iterative DPO (base model: {base})",
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
    evaluated = [entry for entry in record["rounds"] if "eval" in entry]
    if evaluated:
        metrics = list(next(iter(evaluated[0]["eval"]["scores"].values())))
        kind = record["plan"]["average"].upper()
        for metric in metrics:
            lines += ["", f"{metric.replace('_', ' ')}: {evaluated[0]['eval']['metric']}", "",
                      f"| round | reference | last checkpoint | {kind} |", "|---|---|---|---|"]  # fmt: skip
            for entry in evaluated:
                scores = entry["eval"]["scores"]
                cells = " | ".join(f"{scores[name][metric]:.4f}" for name in ("reference", "last checkpoint", "average"))
                lines.append(f"| {entry['round']} | {cells} |")
    return "\n".join(lines)


def write_rounds_table(record: dict, workdir: Path) -> None:
    """Write `rounds.md` and, when the rounds were scored, `rounds.png` (with matplotlib; else a note in rounds.md)."""
    text = rounds_table(record, workdir) + "\n"
    if any("eval" in entry for entry in record["rounds"]):
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
    evaluated = [entry for entry in record["rounds"] if "eval" in entry]
    metrics = list(next(iter(evaluated[0]["eval"]["scores"].values())))
    figure = Figure(figsize=(4.2 * len(metrics), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    rounds = [entry["round"] for entry in evaluated]
    styles = {
        "average": dict(color="#3b75af", marker="o", label=record["plan"]["average"].upper()),
        "last checkpoint": dict(color="#c44e52", marker="s", label="last checkpoint"),
        "reference": dict(color="gray", marker="^", linestyle="--", label="reference"),
    }
    for index, metric in enumerate(metrics, 1):
        axes = figure.add_subplot(1, len(metrics), index)
        for name, style in styles.items():
            axes.plot(rounds, [entry["eval"]["scores"][name][metric] for entry in evaluated], **style)
        axes.set_xticks(rounds)
        axes.set_xlabel("round")
        axes.set_title(metric.replace("_", " "), fontsize=10)
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle(evaluated[0]["eval"]["metric"], fontsize=9)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.15, top=0.82, wspace=0.3)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)
    return True


def rounds_card(record: dict, workdir: Path, *, repo_id: str) -> str:
    """The model card of the main branch: the rounds table, and how to load each round's branch."""
    metadata = card_metadata({"training": {"tags": ["dpo", "iterative-dpo"]}})
    last = record["rounds"][-1]["round"]
    return f"""---
{metadata_yaml(metadata)}
---

# Iterative DPO rounds

Each round of this run is on its own branch, `round-K`: the round's {record['plan']['average'].upper()}, made by
[bema-offline](https://pypi.org/project/bema-offline/) from the round's checkpoints (its own card gives each
checkpoint's effective weight).

{rounds_table(record, workdir)}

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="round-{last}")
```
"""
