"""What an output folder says about itself: the provenance JSON and the model card.

The card is rendered from the provenance record alone, so that `bema-offline push` can render it again for the
repo it pushes to (the load snippet names the repo) without the checkpoints at hand.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from .._version import __version__
from ..engine.plan import OutputSpec, Plan
from ..errors import BemaError
from ..files import replace_file
from ..methods.base import Method
from ..sources.run import BASE_STEP
from ..sources.runinfo import TrainingInfo, detect_training, is_hub_id
from .chart import card_chart, source_name

PROVENANCE_FILE = "bema_offline.json"
PROVENANCE_LIMIT = 64 * 2**20  # the record lists every input file and weight: a few KiB to a few MiB
CARD_FILE = "README.md"
BEMA_PAPER = "https://arxiv.org/abs/2508.00180"


def run_training(plan: Plan) -> TrainingInfo:
    """What the run says about its training (method, base model): the same for every output of a plan."""
    newest_first = [plan.sources[s].folder for s in sorted(plan.sources, reverse=True) if s != BASE_STEP]
    return detect_training(plan.run_dir, newest_first)


def provenance(plan: Plan, output: OutputSpec, *, settings: dict, training: TrainingInfo) -> dict:
    """The record of how one output was made: tool, method and parameters, steps, weights, the inputs' files and
    what the run says about its training (`run_training`, read once for all the outputs). Every path is absolute and
    resolved (`push` uploads a copy with paths relative to the run)."""
    run = plan.schedules[output.schedule_index] if output.replayed else None
    base_model_id = plan.base_model if is_hub_id(plan.base_model) else training.base_model_id
    steps = {
        "found": plan.found_steps,
        "used": sorted(output.weights),
        "ignored": [s for s in plan.found_steps if s not in output.weights],  # by this output (a sweep's others may read them)
    }
    if run is not None:
        steps.update({
            "update_steps_used": [s for s in run.update_steps if s <= output.step],
            "update_steps_missing_skipped": run.missing_steps,  # the first ones; all are counted below
            "update_steps_missing_count": run.missing_count,
            "theta0": run.schedule.theta0_step,
        })
    return {
        "tool": "bema-offline",
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kind": output.kind,
        "method": output.method.to_dict() if output.method is not None else None,
        "step": output.step,
        "config": output.config or None,
        "schedule": run.schedule.to_dict() if run is not None else None,
        "settings": settings,
        "run_dir": plan.origin or str(plan.run_dir.resolve()),
        "base_model": _local_or_hub(plan.base_model),
        "base_model_id": base_model_id,
        "training": training.to_dict(),
        "steps": steps,
        "effective_weights": [
            {"step": step, "source": source_name(step), "weight": weight} for step, weight in sorted(output.weights.items())
        ],
        "inputs": [
            {
                "step": step,
                "folder": str(source.folder.resolve()),
                "layout": source.layout,
                "notes": list(source.notes),
                "files": [
                    {"name": _relative(path, source.folder), "size": identity.size, "mtime_ns": identity.mtime_ns}
                    for path, identity in sorted(source.identities.items())
                ],
            }
            for step, source in sorted(plan.sources.items())
            if step in output.weights or (plan.lora is not None and step == BASE_STEP)  # W0 of every LoRA checkpoint
        ],
        "tensors": len(plan.tensors),
        **({"lora": lora_record(plan)} if plan.lora is not None else {}),
    }


LORA_ARITHMETIC = (
    "Each checkpoint's weights are W0 + s·B·A (the base model and the adapter's factors); the output is "
    "W0 + s·Σ wᵢ·Bᵢ·Aᵢ with the effective weights above, computed in one product of stacked factors per block of "
    "rows. BEMA and EMA are computed from their effective weights too: TRL's op-by-op replay (and TRL's "
    "BEMACallback, which cannot run on a PEFT model) needs every checkpoint's full weights."
)


def lora_record(plan: Plan) -> dict:
    """What the provenance says about a LoRA run: the adapter, the options, and how the average was computed."""
    lora = plan.lora
    layout = lora.run.layout
    config = layout.config
    return {
        "output": lora.output,
        "average": lora.average,
        "rank": lora.rank,
        "arithmetic": LORA_ARITHMETIC if lora.average == "exact" else (
            "--lora-average factors: A and B averaged separately, W0 + s·(Σ wᵢ·Bᵢ)(Σ wᵢ·Aᵢ), which is not the average "
            "of the checkpoints' weights; factor_differences gives each module's relative Frobenius difference from it"
        ),
        "adapter": {
            "config": str(config.path.resolve()),
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "use_rslora": config.use_rslora,
            "rank_pattern": config.rank_pattern,
            "alpha_pattern": config.alpha_pattern,
            "use_dora": config.use_dora,
            "init_lora_weights": config.init_lora_weights,
            "base_model_name_or_path": config.base_model_name_or_path,
            "modules": len(layout.modules),
            "targets": sorted({module.module.rpartition(".")[2] for module in layout.modules.values()}),
            "scalings": sorted({module.scaling for module in layout.modules.values()}),
            "trained_in_full": sorted(layout.full_tensors),
            "lora_biases": sorted(layout.lora_biases),
            "untied": sorted(layout.untied),
        },
    }


def _relative(path: Path, folder: Path) -> str:
    """A source file's name inside its folder (a sharded FSDP or DeepSpeed checkpoint keeps files in subfolders)."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:  # outside its folder (a link into the Hub cache, say): named by its own name
        return path.name


def _local_or_hub(name: str | None) -> str | None:
    """A base model as a Hub repo id, or as an absolute local path (one form for every path in the record)."""
    if name is None or is_hub_id(name):
        return name
    return str(Path(name).expanduser().resolve())


def record_method(record: dict) -> Method | None:
    """The method a provenance record names (older records name only a kind and a schedule), or None."""
    data = record.get("method")
    if data is None and isinstance(record.get("schedule"), dict):
        data = {"method": "ema" if record.get("kind") == "ema" else "bema", **record["schedule"]}
    try:
        return Method.from_dict(data) if isinstance(data, dict) else None
    except BemaError:
        return None


def write_card(folder: Path, record: dict, *, repo_id: str | None = None, revision: str | None = None) -> Path:
    """Write `README.md` and its chart of the effective weights (`effective_weights.svg`) into an output folder.

    Args:
        folder (`Path`): the output folder.
        record (`dict`): its provenance record (`bema_offline.json`).
        repo_id (`str`, *optional*): the Hub repo the folder is pushed to; the load snippet uses it.
        revision (`str`, *optional*): the branch it is pushed to, when not the main one.

    Returns:
        `Path`: the card's path.
    """
    weights = {entry["step"]: entry["weight"] for entry in record["effective_weights"]}
    chart = card_chart(folder, weights, title=f"{_what(record)} at step {record['step']}: effective weights")
    card = model_card(record, repo_id=repo_id, revision=revision, chart=chart)
    # a path that is not valid UTF-8 (a byte the file system allows) is shown escaped, never fails the write
    replace_file(folder / CARD_FILE, card.encode("utf-8", errors="backslashreplace"))
    return folder / CARD_FILE


def card_metadata(record: dict) -> dict:
    """The card's metadata: base model (a Hub id, when known), library and tags."""
    lora = record.get("lora") or {}
    tags = ["bema", "bema-offline", *(["lora"] if lora else []), *record.get("training", {}).get("tags", [])]
    library = "peft" if lora.get("output") == "adapter" else "transformers"
    metadata = {"base_model": record.get("base_model_id"), "library_name": library, "tags": list(dict.fromkeys(tags))}
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


def model_card(record: dict, *, repo_id: str | None = None, revision: str | None = None, chart: str = "") -> str:
    """A Hub model card (`README.md`'s text) for one output, from its provenance record.

    Args:
        record (`dict`): the output's provenance record.
        repo_id (`str`, *optional*): where it is pushed; the load snippet uses it, else a placeholder path.
        revision (`str`, *optional*): the branch it is pushed to.
        chart (`str`, defaults to ""): the Markdown of the weights chart (`chart.card_chart`).
    """
    steps = record["steps"]
    weights = {entry["step"]: entry["weight"] for entry in record["effective_weights"]}
    run_name = Path(record["run_dir"]).name
    training = record.get("training") or {}
    trained_with = training.get("method")
    settings = record.get("settings") or {}
    method = record.get("method") or {}
    theta0 = steps.get("theta0")
    parameters = [
        ("output", f"{record['kind']} at step {record['step']}"),
        *([("θ0", source_name(theta0) + (f" (`{record['base_model']}`)" if theta0 == BASE_STEP else ""))] if theta0 is not None else []),
        *((name, f"`{value}`") for name, value in (record.get("schedule") or {k: v for k, v in method.items() if k != "method"}).items()),
        ("accumulation dtype", f"`{settings.get('accum_dtype', 'float32')}`"),
        ("output dtype", f"`{settings.get('dtype') or 'as the checkpoints'}`"),
    ]
    if record.get("config"):
        parameters.insert(0, ("config", f"`{record['config']}`"))
    if "update_steps_used" in steps:
        skipped = [s for s in steps.get("update_steps_missing_skipped", []) if s <= record["step"]]
        step_lines = [
            f"- Update steps used: {_steps(steps['update_steps_used'])}",
            f"- Update steps skipped (no checkpoint): {_steps(skipped)}",
            f"- Checkpoints not used (off the update steps, or after this output's step): {_steps(steps['ignored'])}",
        ]
    else:
        step_lines = [f"- Sources used: {_steps(steps.get('used', sorted(weights)))}", f"- Checkpoints not used: {_steps(steps['ignored'])}"]
    model = repo_id or "path/to/this/folder"
    revision_arg = f', revision="{revision}"' if revision else ""
    negative = " Some weights are negative: the output extrapolates beyond the sources." if min(weights.values()) < 0 else ""
    newline = "\n"
    body = f"""
# {_what(record)} of `{run_name}` at step {record["step"]}

This {"adapter" if (record.get("lora") or {}).get("output") == "adapter" else "model"} averages the checkpoints of a training run: {_long_name(record)}, computed offline by
[bema-offline](https://pypi.org/project/bema-offline/) {record.get("version", __version__)} from the saved
checkpoints{" (replaying TRL's `BEMACallback` schedule, [BEMA: Block & Zhang, arXiv 2508.00180](" + BEMA_PAPER + "))" if record["kind"] in ("bema", "ema") and record.get("schedule") else ""}.

- Training run: `{run_name}`{f" ({trained_with.upper()}, read from {training.get('evidence')})" if trained_with else ""}
- Base model (the weights before training): `{record.get("base_model") or "not given"}`

## Parameters

| parameter | value |
|---|---|
{_rows(parameters)}

## Steps

- Checkpoints found: {_steps(steps["found"])}
{newline.join(step_lines)}

## Effective weight of each checkpoint

The output is an affine combination of the sources; the weights sum to 1 (here {sum(weights.values()):.6f}).{negative}

| source | step | weight |
|---|---|---|
{_rows([(source_name(s), str(s), f"{w:+.6f}") for s, w in sorted(weights.items())])}

{chart}

{_lora_section(record)}## Use

{_use(record, model, revision_arg)}

## Provenance

`{PROVENANCE_FILE}` records the method and its parameters, the settings, the steps and the input files (names,
sizes, times).
"""
    card = f"---\n{metadata_yaml(card_metadata(record))}\n---\n{body}"
    if record.get("selection"):  # OUTPUT/best of a --select-by sweep: its leaderboard stays in every rendering
        from ..eval.leaderboard import with_selection

        card = with_selection(card, record["selection"])
    return card


_SHORT_NAMES = {"bema": "BEMA", "ema": "EMA", "dema": "DEMA", "ouema": "OU-EMA", "uniform": "Uniform average",
                "power-ema": "Power EMA", "wsm": "WSM merge", "expo": "ExPO extrapolation"}  # fmt: skip


def _use(record: dict, model: str, revision_arg: str) -> str:
    """The load snippet: transformers for a model folder, peft on the base model for an adapter output."""
    lines = ["```python"]
    if (record.get("lora") or {}).get("output") == "adapter":
        base = record.get("base_model_id") or record.get("base_model") or "path/to/the/base/model"
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{model}"{revision_arg})  # or .merge_and_unload() for a plain model',
            f'tokenizer = AutoTokenizer.from_pretrained("{model}"{revision_arg})',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{model}"{revision_arg})',
            f'tokenizer = AutoTokenizer.from_pretrained("{model}"{revision_arg})',
        ]
    lines += [
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "outputs = model.generate(**inputs, max_new_tokens=32)",
        "print(tokenizer.decode(outputs[0], skip_special_tokens=True))",
        "```",
    ]
    return "\n".join(lines)


def _lora_section(record: dict) -> str:
    """What a LoRA run's card says about the adapter and how it was averaged ("" for other runs)."""
    lora = record.get("lora")
    if not lora:
        return ""
    adapter = lora["adapter"]
    rule = "lora_alpha/√r (rslora)" if adapter.get("use_rslora") else "lora_alpha/r"
    scalings = ", ".join(f"{s:g}" for s in adapter.get("scalings", []))
    lines = [
        "## LoRA",
        "",
        f"The run trained a LoRA adapter{' (DoRA)' if adapter.get('use_dora') else ''}: r={adapter['r']}, "
        f"lora_alpha={adapter['lora_alpha']:g}, scaling {rule} = {scalings}, on {adapter['modules']} modules "
        f"({', '.join(adapter['targets'])}) of the base model.",
    ]
    if adapter.get("trained_in_full"):
        lines.append(f"Trained in full beside it (averaged as they are): {', '.join(f'`{n}`' for n in adapter['trained_in_full'])}.")
    lines += ["", LORA_ARITHMETIC if lora.get("average") == "exact" else "", ""]
    if lora.get("average") == "factors":
        differences = lora.get("factor_differences") or {}
        worst = f" The largest relative difference from the exact average is {max(differences.values()):.3g}." if differences else ""
        lines += [
            "**Warning:** A and B were averaged separately (`--lora-average factors`): W0 + s·(Σ wᵢ·Bᵢ)(Σ wᵢ·Aᵢ), which "
            f"is not the average of the checkpoints' weights.{worst} `{PROVENANCE_FILE}` gives each module's.",
            "",
        ]
    if lora.get("output") == "adapter":
        error = lora.get("max_truncation_error")
        if error is not None:
            lines.append(
                f"This folder is a PEFT adapter truncated to rank {lora['rank']} by SVD; the largest relative Frobenius "
                f"error of a module is {error:.3g} (each module's is in `{PROVENANCE_FILE}`)."
            )
        elif lora.get("average") == "exact":
            lines.append(
                "This folder is a PEFT adapter that holds the average exactly: the factors of every checkpoint stacked "
                "(rank r × checkpoints), each B scaled by its weight and the scaling (so `lora_alpha` = r). Load it onto "
                "the base model with peft."
            )
        else:
            lines.append("This folder is a PEFT adapter of the averaged factors, at the run's own rank and scaling.")
    else:
        lines.append("This folder is the merged model: a full model folder, which loads without peft.")
    if adapter.get("untied"):
        lines.append(f"The adapter changed one side of the tied embeddings, so the output unties them ({', '.join(adapter['untied'])}).")
    return "\n".join(lines) + "\n\n"


def _what(record: dict) -> str:
    method = record_method(record)
    if method is not None and method.name == "ema" and not method.replayed:
        return "EMA (half-life)"
    return _SHORT_NAMES.get(record["kind"], record["kind"])


def _long_name(record: dict) -> str:
    method = record_method(record)
    if method is None:
        return "Bias-Corrected EMA (BEMA)" if record["kind"] == "bema" else "exponential moving average (EMA)"
    return method.describe()


def _rows(rows) -> str:
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def _steps(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps) or "none"
