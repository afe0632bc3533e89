"""The leaderboard as Markdown, rendered from the plain record of a ranking: `eval.json`, or the `selection` entry of
`best/bema_offline.json`. A model card can then be rendered again from the folder's own files (as `bema-offline push`
renders the card for the repo it pushes to), with the leaderboard in it. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import math
from pathlib import PurePath


def format_number(value: float | str | None) -> str:
    """A metric as tables show it: 6 decimals, or NaN / inf (also from eval.json's "NaN", "Infinity")."""
    if isinstance(value, str):
        value = float(value.replace("Infinity", "inf"))
    if value is None:
        return "-"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6f}" if abs(value) < 1e4 else f"{value:.6g}"


def json_number(value: float) -> float | str:
    """A float for strict JSON: non-finite values as the strings "NaN", "Infinity", "-Infinity"."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def leaderboard_markdown(summary: dict) -> str:
    """The leaderboard: the data and the ranking metric, a table of every model and metric, then ties and notes.

    Args:
        summary (`dict`): a ranking as `EvalReport.to_dict` writes it (`metric`, `higher_is_better`, `winner`, `data`,
            `settings`, `ties`, `notes`, and `results` in rank order with `rank`, `label`, `role` and `metrics`).

    Returns:
        `str`: Markdown, starting with a `## Leaderboard` heading.
    """
    metric = summary["metric"]
    results = summary["results"]
    names = list(dict.fromkeys([metric, *(name for r in results for name in r["metrics"])]))
    direction = "higher is better" if summary["higher_is_better"] else "lower is better"
    lines = ["## Leaderboard", ""]
    data = summary.get("data")
    if data:
        split = f", split {data['split']}" if data.get("split") else ""
        lines.append(f"Data: `{PurePath(data['path']).name}` ({data['kind']}{split}, {data['rows']} rows, "
                     f"{data['scored_tokens']} scored tokens).")
    settings = summary.get("settings") or {}
    if "reference" in settings:
        lines.append(f"DPO reference: `{settings['reference']}`, β = {settings['beta']}.")
    lines += [f"Ranked by `{metric}` ({direction}); bold: the winner.", ""]
    lines.append("| rank | model | " + " | ".join(f"`{n}`" for n in names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    ranks = [r["rank"] for r in results]
    for r in results:
        label = f"`{r['label']}`" + (" (baseline)" if r["role"] == "baseline" else "")
        if r["label"] == summary.get("winner") and r["role"] != "baseline":
            label = f"**{label}**"
        rank = "-" if r["rank"] is None else f"{r['rank']}=" if ranks.count(r["rank"]) > 1 else str(r["rank"])
        cells = [rank, label, *(format_number(r["metrics"].get(n)) for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("ties") or summary.get("notes"):
        lines.append("")
        lines += [f"- Tie: {line}" for line in summary.get("ties", [])] + [f"- Note: {line}" for line in summary.get("notes", [])]
    return "\n".join(lines) + "\n"


def with_selection(card: str, selection: dict) -> str:
    """A model card opened (after its YAML front matter) by how the model was selected, and closed by the leaderboard.

    Args:
        card (`str`): the card's text, e.g. `bema_offline.output.card.model_card(record)`.
        selection (`dict`): the `selection` entry of `best/bema_offline.json`.
    """
    averages = sum(r["role"] != "baseline" for r in selection["results"])
    selected = (
        f"> **Selected** by `bema-offline eval`: `{selection['winner']}` is the best of {averages} outputs by "
        f"`{selection['metric']}` ({format_number(selection['value'])}); this folder is a copy of it. The leaderboard "
        "is at the end of this card, and every number in `eval.json`.\n"
    )
    front, separator, body = card.partition("\n---\n") if card.startswith("---\n") else ("", "", card)
    return f"{front}{separator}\n{selected}{body.rstrip()}\n\n{leaderboard_markdown(selection)}"
