"""Per-round evaluation of an iterative run (`bema-offline iterate --eval-data`), with `bema_offline.eval`.

After each round, three models are evaluated on held-out data: the round's reference, its last checkpoint (of a LoRA
round: merged onto the round's policy) and its average. The data's columns choose the metrics (see
`bema_offline.eval.data`):

- preference data (`prompt`, `chosen`, `rejected`): DPO's implicit-reward metrics as TRL's `DPOTrainer` computes
  them (reward accuracy and margin, DPO loss, chosen loss, mean chosen and rejected rewards), with the run's β and
  `max_length`, against the base model: a fixed yardstick, so that the rounds compare (round 1's reference, the
  base itself, scores 0);
- text, chat or prompt-completion data: loss and perplexity per scored token.

The scores go into the round's entry of `rounds.json` with what decides them (the data's fingerprint, the yardstick's,
β, `max_length`, the dtype). A model evaluated before with the same (round k's average is round k+1's reference) is
not evaluated again, and other eval data in a rerun has every round evaluated again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from ..eval import evaluate
from ..eval.data import load_eval_data
from ..eval.leaderboard import json_number
from ..eval.metrics import METRICS
from ..sources.peft import is_adapter_folder
from .rounds_plan import IteratePlan, data_fingerprint

DEFAULT_EVAL_BATCH_SIZE = 8  # TRL's per_device_eval_batch_size


def check_eval_data(path: Path) -> str:
    """Read the eval data once before anything trains, so that unreadable data or columns that fit no metric fail
    now rather than after the first round; returns its kind ("preference", "text", "chat" or "completion").

    Raises:
        `DataError`: one line naming the file, and the row and column at fault.
    """
    return load_eval_data(path, option="--eval-data").kind


def last_model(entry: dict) -> dict:
    """A round's last checkpoint as a model folder, `{path, fingerprint}`: the checkpoint itself, or for a LoRA round
    its merge onto the round's policy (`round-K-last/`).

    Raises:
        `DataError`: a LoRA round whose last checkpoint was not merged.
    """
    training = entry["training"]
    if "last_merged" in training:
        return training["last_merged"]
    if is_adapter_folder(Path(training["last_checkpoint"]["path"])):
        raise DataError(f"{training['last_checkpoint']['path']}: round {entry['round']}'s last checkpoint is a LoRA adapter that was not merged; use a new --workdir")
    return training["last_checkpoint"]


def round_models(entry: dict) -> dict[str, dict]:
    """A round's evaluated models by role: `{path, fingerprint}` each (a LoRA round's last checkpoint merged)."""
    return {"reference": entry["reference"], "last checkpoint": last_model(entry), "average": entry["average"]}


def scores_key(plan: IteratePlan, plan_record: dict) -> dict:
    """What decides a model's scores besides its weights: the data, the yardstick (the base model), β, `max_length`
    and the dtype models are evaluated in (bf16 when the rounds train in bf16, else float32)."""
    dpo = plan_record["dpo"]
    return {
        "data": data_fingerprint(plan.eval_data),
        "yardstick": plan_record["base_model"]["fingerprint"],
        "beta": dpo["beta"],
        "max_length": dpo["max_length"],
        "dtype": "bfloat16" if dpo["bf16"] else "float32",
    }


def evaluate_round(
    plan: IteratePlan, plan_record: dict, entry: dict, earlier: list[dict], *, log: Callable[[str], None], rounds: int
) -> bool:
    """Evaluate a round's reference, last checkpoint and average on `plan.eval_data`, into `entry["eval"]`.

    Args:
        plan (`IteratePlan`): the run's plan (its eval data, base model and training device).
        plan_record (`dict`): the plan as `rounds.json` holds it (β, `max_length`, bf16 resolved).
        entry (`dict`): the round's entry of `rounds.json`; its `eval` is set.
        earlier (`list[dict]`): the entries of the rounds before, whose scores are reused where they apply.
        log (`Callable[[str], None]`): receives one line per model evaluated.
        rounds (`int`): the number of rounds, for the progress line.

    Returns:
        `bool`: whether `entry["eval"]` changed (False when it holds this data's scores with these settings).

    Raises:
        `DataError`: unreadable eval data or models (one line, from `bema_offline.eval`).
    """
    key = scores_key(plan, plan_record)
    if entry.get("eval", {}).get("key") == key:
        return False
    models = round_models(entry)
    known: dict[str, dict] = {}  # fingerprint -> scores with this key
    before = None
    for other in earlier:
        if other.get("eval", {}).get("key") == key:
            before = other["eval"]
            known.update({model["fingerprint"]: before["scores"][role] for role, model in round_models(other).items()})
    todo = {role: model for role, model in models.items() if model["fingerprint"] not in known}
    if todo:
        log(f"round {entry['round']}/{rounds}: evaluating the {', the '.join(todo)} on {plan.eval_data}")
        report = evaluate(
            list(dict.fromkeys(model["path"] for model in todo.values())),
            plan.eval_data,
            ref_model=plan.base_model,
            beta=key["beta"],
            device=_device(plan),
            dtype=key["dtype"],
            batch_size=plan.config_overrides.get("per_device_eval_batch_size") or DEFAULT_EVAL_BATCH_SIZE,
            max_length=key["max_length"],
            tokenizer=plan.base_model,
            log=log,
        )
        by_folder = {Path(ranked.candidate.source).resolve(): ranked.metrics for ranked in report.ranked}
        for model in todo.values():
            metrics = by_folder[Path(model["path"]).resolve()]
            known[model["fingerprint"]] = {name: json_number(value) for name, value in metrics.items()}
        summary = {
            "data": {"path": str(plan.eval_data), **(report.data or {})},
            "description": _description(report.data or {}, key),
            "metrics": {
                name: {"higher_is_better": METRICS[name].higher_is_better, "description": METRICS[name].description}
                for name in report.metric_names
                if name in METRICS
            },
            "settings": report.settings,
        }
    else:  # every model was evaluated in an earlier round (the same weights)
        summary = {name: before[name] for name in ("data", "description", "metrics", "settings")}
    entry["eval"] = {"key": key, **summary, "scores": {role: known[model["fingerprint"]] for role, model in models.items()}}
    return True


def _device(plan: IteratePlan) -> str:
    """Where the rounds train: a CUDA GPU when there is one and `use_cpu` is not set, as the Trainer decides."""
    import torch

    return "cuda" if torch.cuda.is_available() and not plan.config_overrides.get("use_cpu") else "cpu"


def _description(data: dict, key: dict) -> str:
    """One line on what the scores measure, for the rounds table and plot."""
    name = Path(data.get("path", "")).name
    if data.get("kind") == "preference":
        text = f"DPO implicit rewards against the base model (β = {key['beta']}) on {data.get('rows')} held-out pairs of {name}"
    else:
        text = f"loss per token on {data.get('rows')} held-out {data.get('kind')} rows of {name} ({data.get('scored_tokens')} tokens scored)"
    if data.get("dropped_rows"):
        text += f"; {data['dropped_rows']} rows left out (no token to score within max_length {key['max_length']})"
    return text
