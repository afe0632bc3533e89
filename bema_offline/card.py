"""What an output folder says about itself: the provenance JSON and the model card."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .checkpoints import BASE_STEP
from .plan import OutputSpec, Plan

PROVENANCE_FILE = "bema_offline.json"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def source_name(step: int) -> str:
    return "base" if step == BASE_STEP else f"checkpoint-{step}"


def provenance(plan: Plan, output: OutputSpec, *, settings: dict) -> dict:
    """The record of how one output was made: tool, parameters, steps, weights, and the inputs' files."""
    run = plan.schedules[output.schedule_index]
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
        "steps": {
            "found": plan.found_steps,
            "update_steps_used": [s for s in run.update_steps if s <= output.step],
            "update_steps_missing_skipped": run.missing_steps,
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
                "files": [_file_record(path) for path in source.files],
            }
            for step, source in sorted(plan.sources.items())
            if step in output.weights
        ],
        "tensors": len(plan.tensors),
    }


def _file_record(path: Path) -> dict:
    stat = os.stat(path)
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def weights_bar_chart(weights: dict[int, float], *, width: int = 40) -> str:
    """Each source's effective weight as a line of text with a bar (negative weights drawn with '-')."""
    largest = max((abs(w) for w in weights.values()), default=1.0) or 1.0
    lines = []
    for step, weight in sorted(weights.items()):
        bar = ("#" if weight >= 0 else "-") * round(abs(weight) / largest * width)
        lines.append(f"{source_name(step):>17} {weight:+.6f} {bar}")
    return "\n".join(lines)


def model_card(plan: Plan, output: OutputSpec, *, title: str | None = None, chart_file: str | None = None) -> ModelCard:
    """A Hub model card for one output, with metadata, the parameter table, the steps and the weights."""
    run = plan.schedules[output.schedule_index]
    base = plan.base_model
    base_id = base if base and _REPO_ID.fullmatch(base) and not Path(base).exists() else None
    tags = ["bema", "bema-offline"]
    data = ModelCardData(base_model=base_id, library_name="transformers", tags=tags)
    what = "Bias-Corrected EMA (BEMA)" if output.kind == "bema" else "exponential moving average (EMA)"
    params = "\n".join(f"| `{name}` | {value} |" for name, value in run.schedule.to_dict().items())
    weights = "\n".join(
        f"| {source_name(step)} | {weight:+.6f} |" for step, weight in sorted(output.weights.items())
    )
    skipped = ", ".join(str(s) for s in run.missing_steps) or "none"
    ignored = ", ".join(str(s) for s in plan.ignored_steps) or "none"
    chart = f"\n![effective weights]({chart_file})\n" if chart_file else ""
    body = f"""
# {title or f"{what} of {plan.run_dir.name}, step {output.step}"}

This model is the {what} of a training run's checkpoints at step {output.step}, computed offline by
[bema-offline](https://pypi.org/project/bema-offline/) {__version__} (BEMA: Block & Zhang, arXiv 2508.00180).
It replays TRL's `BEMACallback` schedule from the saved checkpoints.

- Run: `{plan.run_dir.name}`; base model (θ0 at step 0): `{base or "none (θ0 is a checkpoint)"}`
- θ0: {source_name(run.schedule.theta0_step)}

## Schedule

| parameter | value |
|---|---|
{params}

## Steps

- Update steps used: {", ".join(str(s) for s in run.update_steps if s <= output.step)}
- Update steps skipped (no checkpoint): {skipped}
- Checkpoints not on an update step (ignored): {ignored}

## Effective weight of each checkpoint

The output is an affine combination of θ0 and the checkpoints; the weights sum to 1.

| source | weight |
|---|---|
{weights}
{chart}
```
{weights_bar_chart(output.weights)}
```

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")
inputs = tokenizer("Hello", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
