"""What an output folder says about itself: the provenance JSON and the model card.

The card is rendered from the provenance record alone, so that `bema-offline push` can render it again for the
repo it pushes to (the load snippet names the repo) without the checkpoints at hand.
"""

from __future__ import annotations

import datetime
import io
import os
import re
from pathlib import Path

from .._version import __version__
from ..engine.plan import OutputSpec, Plan
from ..files import replace_file
from ..sources.run import BASE_STEP
from ..sources.runinfo import TrainingInfo, detect_training, is_hub_id

PROVENANCE_FILE = "bema_offline.json"
PROVENANCE_LIMIT = 64 * 2**20  # the record lists every input file and weight: a few KiB to a few MiB
CARD_FILE = "README.md"
CHART_FILE = "effective_weights.png"
BEMA_PAPER = "https://arxiv.org/abs/2508.00180"


def source_name(step: int) -> str:
    return "base" if step == BASE_STEP else f"checkpoint-{step}"


def run_training(plan: Plan) -> TrainingInfo:
    """What the run says about its training (method, base model): the same for every output of a plan."""
    newest_first = [plan.sources[s].folder for s in sorted(plan.sources, reverse=True) if s != BASE_STEP]
    return detect_training(plan.run_dir, newest_first)


def provenance(plan: Plan, output: OutputSpec, *, settings: dict, training: TrainingInfo) -> dict:
    """The record of how one output was made: tool, parameters, steps, weights, the inputs' files and what the
    run says about its training (`run_training`, read once for all the outputs)."""
    run = plan.schedules[output.schedule_index]
    base_model_id = plan.base_model if is_hub_id(plan.base_model) else training.base_model_id
    return {
        "tool": "bema-offline",
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kind": output.kind,
        "step": output.step,
        "config": run.name or None,
        "schedule": run.schedule.to_dict(),
        "settings": settings,
        "run_dir": str(plan.run_dir.resolve()),
        "base_model": plan.base_model,
        "base_model_id": base_model_id,
        "training": training.to_dict(),
        "steps": {
            "found": plan.found_steps,
            "update_steps_used": [s for s in run.update_steps if s <= output.step],
            "update_steps_missing_skipped": run.missing_steps,  # the first ones; all are counted below
            "update_steps_missing_count": run.missing_count,
            "ignored": [s for s in plan.found_steps if s not in plan.sources],
            "theta0": run.schedule.theta0_step,
        },
        "effective_weights": [
            {"step": step, "source": source_name(step), "weight": weight} for step, weight in sorted(output.weights.items())
        ],
        "inputs": [
            {
                "step": step,
                "folder": str(source.folder.resolve()),
                "files": [
                    {"name": path.name, "size": identity.size, "mtime_ns": identity.mtime_ns}
                    for path, identity in sorted(source.identities.items())
                ],
            }
            for step, source in sorted(plan.sources.items())
            if step in output.weights
        ],
        "tensors": len(plan.tensors),
    }


def weights_bar_chart(weights: dict[int, float], *, width: int = 40) -> str:
    """Each source's effective weight as a line of text with a bar (negative weights drawn with '-')."""
    largest = max((abs(w) for w in weights.values()), default=1.0) or 1.0
    lines = []
    for step, weight in sorted(weights.items()):
        bar = ("#" if weight >= 0 else "-") * round(abs(weight) / largest * width)
        lines.append(f"{source_name(step):>17} {weight:+.6f} {bar}")
    return "\n".join(lines)


def weights_png(weights: dict[int, float], path: Path, *, title: str) -> bool:
    """Draw the effective weights as a bar chart PNG at `path`.

    Returns:
        `bool`: False, writing nothing, when matplotlib is not installed (it is in the `plot` extra).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    steps = sorted(weights)
    values = [weights[s] for s in steps]
    width = min(12.0, max(4.0, 0.3 * len(steps) + 1.5))  # inches
    figure = Figure(figsize=(width, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(range(len(steps)), values, color=["#3b75af" if v >= 0 else "#c44e52" for v in values])
    axes.axhline(0.0, color="black", linewidth=0.8)
    every = -(-len(steps) // 30)  # at most 30 tick labels
    ticks = list(range(0, len(steps), every))
    axes.set_xticks(ticks, [source_name(steps[i]).replace("checkpoint-", "") for i in ticks], rotation=45)
    axes.set_xlabel("source (base, then checkpoint step)")
    axes.set_ylabel("effective weight")
    axes.set_title(title, fontsize=10)
    # fixed margins in inches (tight_layout doubles the cost)
    figure.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.3, top=0.88)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    replace_file(path, png.getvalue())
    return True


def write_card(
    folder: Path, record: dict, *, repo_id: str | None = None, revision: str | None = None, chart: bool = True
) -> Path:
    """Write `README.md` (and the weights chart PNG when matplotlib is installed) into an output folder.

    Args:
        folder (`Path`): the output folder.
        record (`dict`): its provenance record (`bema_offline.json`).
        repo_id (`str`, *optional*): the Hub repo the folder is pushed to; the load snippet uses it.
        revision (`str`, *optional*): the branch it is pushed to, when not the main one.
        chart (`bool`, defaults to True): draw the chart PNG. `bema-average` leaves it to `push` (importing
            matplotlib costs most of a second, in every run); the card then shows the text chart and says so.

    Returns:
        `Path`: the card's path.
    """
    weights = {entry["step"]: entry["weight"] for entry in record["effective_weights"]}
    path = folder / CHART_FILE
    drawn = chart and weights_png(weights, path, title=f"{_what(record)} at step {record['step']}: effective weights")
    if not drawn and os.path.lexists(path):
        os.unlink(path)  # a stale chart from an earlier render would contradict the card
    if drawn:
        note = None
    elif chart:
        note = (
            "The chart below is text because matplotlib was not installed when this card was written "
            "(`pip install 'bema-offline[plot]'` draws it as a PNG)."
        )
    else:
        note = (
            "The chart below is text; `bema-offline push` draws it as a PNG for the Hub "
            "(with matplotlib: `pip install 'bema-offline[plot]'`)."
        )
    card = model_card(record, repo_id=repo_id, revision=revision, chart_file=CHART_FILE if drawn else None, chart_note=note)
    # a path that is not valid UTF-8 (a byte the file system allows) is shown escaped, never fails the write
    replace_file(folder / CARD_FILE, card.encode("utf-8", errors="backslashreplace"))
    return folder / CARD_FILE


def card_metadata(record: dict) -> dict:
    """The card's metadata: base model (a Hub id, when known), library and tags."""
    tags = ["bema", "bema-offline", *record.get("training", {}).get("tags", [])]
    metadata = {"base_model": record.get("base_model_id"), "library_name": "transformers", "tags": list(dict.fromkeys(tags))}
    return {key: value for key, value in metadata.items() if value is not None}


def metadata_yaml(metadata: dict) -> str:
    """The card's YAML front matter, written without a YAML library (huggingface_hub's card classes would cost a
    quarter of a second of imports in every run): lists one item per line, and strings plain where YAML reads them
    back as the same string (`dpo`, `org/model`), else double-quoted with every character outside printable ASCII
    escaped (`\\uXXXX`, or `\\UXXXXXXXX` beyond the BMP: YAML reads JSON's surrogate pairs as two characters)."""

    def scalar(text: str) -> str:
        if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
            return text
        escaped = (
            "\\" + c if c in '"\\' else c if " " <= c <= "~" else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
            for c in text
        )
        return '"' + "".join(escaped) + '"'

    lines = []
    for key, value in metadata.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {scalar(item)}" for item in value)]
        else:
            lines.append(f"{key}: {scalar(value)}")
    return "\n".join(lines)


_PLAIN = re.compile(r"[A-Za-z_][\w./-]*", re.ASCII)
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}  # (YAML 1.1 reads these as booleans or null)


def model_card(
    record: dict,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    chart_file: str | None = None,
    chart_note: str | None = None,
) -> str:
    """A Hub model card (`README.md`'s text) for one output, from its provenance record.

    Args:
        record (`dict`): the output's provenance record.
        repo_id (`str`, *optional*): where it is pushed; the load snippet uses it, else a placeholder path.
        revision (`str`, *optional*): the branch it is pushed to.
        chart_file (`str`, *optional*): the chart PNG beside the card; without it the card shows the text chart
            only, after `chart_note` (why there is no PNG).
    """
    steps = record["steps"]
    schedule = record["schedule"]
    weights = {entry["step"]: entry["weight"] for entry in record["effective_weights"]}
    run_name = Path(record["run_dir"]).name
    what = _what(record)
    training = record.get("training") or {}
    method = training.get("method")
    skipped = [s for s in steps["update_steps_missing_skipped"] if s <= record["step"]]
    settings = record.get("settings") or {}
    parameters = [
        ("output", f"{record['kind']} at step {record['step']}"),
        ("θ0", f"{source_name(steps['theta0'])}" + (f" (`{record['base_model']}`)" if steps["theta0"] == BASE_STEP else "")),
        *((name, f"`{value}`") for name, value in schedule.items()),
        ("accumulation dtype", f"`{settings.get('accum_dtype', 'float32')}`"),
        ("output dtype", f"`{settings.get('dtype') or 'as the checkpoints'}`"),
    ]
    if record.get("config"):
        parameters.insert(0, ("config", f"`{record['config']}`"))
    chart = f"![effective weight of each checkpoint]({chart_file})" if chart_file else (chart_note or "")
    model = repo_id or "path/to/this/folder"
    revision_arg = f', revision="{revision}"' if revision else ""
    body = f"""
# {what} of `{run_name}` at step {record["step"]}

This model is the {_long_name(record)} of a training run's checkpoints at step {record["step"]}, computed offline by
[bema-offline](https://pypi.org/project/bema-offline/) {record.get("version", __version__)}, which replays TRL's
`BEMACallback` schedule from the saved checkpoints ([BEMA: Block & Zhang, arXiv 2508.00180]({BEMA_PAPER})).

- Training run: `{run_name}`{f" ({method.upper()}, read from {training.get('evidence')})" if method else ""}
- Base model (the weights before training): `{record.get("base_model") or "not given"}`

## Parameters

| parameter | value |
|---|---|
{_rows(parameters)}

## Steps

- Checkpoints found: {_steps(steps["found"])}
- Update steps used: {_steps(steps["update_steps_used"])}
- Update steps skipped (no checkpoint): {_steps(skipped)}
- Checkpoints not on an update step (not used): {_steps(steps["ignored"])}

## Effective weight of each checkpoint

The output is an affine combination of θ0 and the checkpoints; the weights sum to 1
(here {sum(weights.values()):.6f}).

| source | step | weight |
|---|---|---|
{_rows([(source_name(s), str(s), f"{w:+.6f}") for s, w in sorted(weights.items())])}

{chart}

```
{weights_bar_chart(weights)}
```

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model}"{revision_arg})
tokenizer = AutoTokenizer.from_pretrained("{model}"{revision_arg})
inputs = tokenizer("The capital of France is", return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=32)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
```

## Provenance

`{PROVENANCE_FILE}` records the schedule, the settings, the steps and the input files (names, sizes, times).
"""
    return f"---\n{metadata_yaml(card_metadata(record))}\n---\n{body}"


def _what(record: dict) -> str:
    return "BEMA" if record["kind"] == "bema" else "EMA"


def _long_name(record: dict) -> str:
    return "Bias-Corrected EMA (BEMA)" if record["kind"] == "bema" else "exponential moving average (EMA)"


def _rows(rows) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def _steps(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps) or "none"
