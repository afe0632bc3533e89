"""The plan of an iterative DPO run (`bema-offline iterate`), and its fingerprint.

`IteratePlan` holds the options. `plan_record` is what `rounds.json` keeps of them: the settings that decide every
round's weights, with TRL's defaults resolved, so that a rerun can be compared with the run it continues
(`plan_differences` names what differs, as options).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError
from ..methods.schedule import BEMASchedule
from .dpo import _jsonable, dpo_config

REFERENCES = ("bema", "ema", "last", "base")
AVERAGED_REFERENCES = ("bema", "ema")  # the reference kinds that are an average of the round before
POLICY_INITS = ("reference", "last")
# DPOConfig fields that would break resuming or the averages (on top of what `bema-offline dpo` refuses).
ITERATE_REFUSED_FIELDS = {
    "save_only_model": "iterate keeps the optimizer state of the newest checkpoint, to resume a killed round",
    "save_total_limit": "the average of each round needs all its checkpoints",
    "resume_from_checkpoint": "iterate resumes by itself: run the same command again",
}
# DPOConfig fields that change what a run prints, not what it computes: left out of the plan's fingerprint.
PRESENTATION_FIELDS = {"disable_tqdm", "report_to", "run_name", "log_level", "logging_dir", "logging_steps", "logging_first_step", "logging_strategy"}

@dataclass(frozen=True)
class IteratePlan:
    """Everything that decides what an iterative run computes, plus how it reports (eval data, Hub).

    Args:
        base_model (`Path`): round 1's policy and reference (a model folder).
        datasets (`tuple[Path, ...]`): preference data, one for every round or one per round.
        rounds (`int`): the number of rounds K.
        workdir (`Path`): where the rounds, averages and `rounds.json` go.
        save_steps (`int`): checkpoint cadence of each round, also the `update_freq` of its average.
        reference (`str`, defaults to "bema"): "bema", "ema", "last" or "base" (see the module's docstring).
        policy_init (`str`, *optional*): "reference" or "last"; defaults to "last" with reference "base" (else every
            round would start from the base again), "reference" otherwise.
        max_steps, beta, learning_rate, per_device_train_batch_size, bf16, precompute_ref_log_probs: each round's
            DPO settings (TRL's defaults when None).
        config_overrides (`dict`): any other DPOConfig fields.
        schedule (`BEMASchedule`): the averages' schedule; `update_freq` is `save_steps`, `update_after` 0.
        eval_data (`Path`, *optional*): held-out preference data scored after each round (not part of the plan's
            fingerprint: it may change between runs, and the scores are then computed again).
        push_to_hub (`str`, *optional*): ORG/NAME; each round's average goes to branch `round-K`.
        private (`bool`, defaults to False): create the Hub repo private.
    """

    base_model: Path
    datasets: tuple[Path, ...]
    rounds: int
    workdir: Path
    save_steps: int
    reference: str = "bema"
    policy_init: str | None = None
    max_steps: int | None = None
    beta: float | None = None
    learning_rate: float | None = None
    per_device_train_batch_size: int | None = None
    bf16: bool | None = None
    precompute_ref_log_probs: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    schedule: BEMASchedule | None = None
    eval_data: Path | None = None
    push_to_hub: str | None = None
    private: bool = False

    @property
    def policy_start(self) -> str:
        if self.policy_init is not None:
            return self.policy_init
        return "last" if self.reference == "base" else "reference"

    @property
    def average_kind(self) -> str:
        """What each round's average is: the reference's kind when the reference is an average, else BEMA."""
        return self.reference if self.reference in AVERAGED_REFERENCES else "bema"

    @property
    def bema_schedule(self) -> BEMASchedule:
        return self.schedule if self.schedule is not None else BEMASchedule(update_freq=self.save_steps)

    def dataset_for_round(self, k: int) -> Path:
        return self.datasets[0] if len(self.datasets) == 1 else self.datasets[k - 1]

    def check(self) -> None:
        """Refuse inconsistent settings, with one line each."""
        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")
        if len(self.datasets) not in (1, self.rounds):
            raise UsageError(f"--dataset given {len(self.datasets)} times; give it once, or once per round ({self.rounds})")
        if self.save_steps < 1:
            raise UsageError(f"--save-steps must be at least 1, got {self.save_steps}")
        if self.reference not in REFERENCES:
            raise UsageError(f"--reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.policy_init not in (None, *POLICY_INITS):
            raise UsageError(f"--policy-init must be reference or last, got {self.policy_init!r}")
        if self.reference == "base" and self.policy_init == "reference":
            raise UsageError("--reference base with --policy-init reference would start every round from the base again; use --policy-init last")
        schedule = self.bema_schedule
        if schedule.update_freq != self.save_steps or schedule.update_after != 0:
            raise UsageError(
                f"the averages update at every checkpoint from the round's start: update_freq must be --save-steps "
                f"({self.save_steps}) and update_after 0, got {schedule.update_freq} and {schedule.update_after}"
            )
        for key in self.config_overrides:
            if key in ITERATE_REFUSED_FIELDS:
                raise UsageError(f"--config-set {key}: not allowed, {ITERATE_REFUSED_FIELDS[key]}")


def data_fingerprint(path: str | Path) -> str:
    """sha256 of a data file's bytes, or of every file (relative path and bytes) of a `save_to_disk` folder.

    Raises:
        `DataError`: no such file or folder.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"--dataset {path}: no such file or folder")
    for file in files:
        if path.is_dir():
            digest.update((file.relative_to(path).as_posix() + "\n").encode())
        with open(file, "rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
    return digest.hexdigest()


def plan_record(plan: IteratePlan, base_fingerprint: str) -> dict:
    """What `rounds.json` keeps of the plan: the settings that decide every round's weights, resolved (TRL's
    defaults filled in), so that leaving an option out and giving its default value are the same plan. The number
    of rounds and the data are checked per round instead, so that a finished run can be extended."""
    config = dpo_config(
        plan.workdir / "round-1",
        beta=plan.beta,
        learning_rate=plan.learning_rate,
        max_steps=plan.max_steps,
        per_device_train_batch_size=plan.per_device_train_batch_size,
        save_steps=plan.save_steps,
        bf16=plan.bf16,
        precompute_ref_log_probs=plan.precompute_ref_log_probs,
        overrides=plan.config_overrides,
    )
    return {
        "base_model": {"path": str(plan.base_model), "fingerprint": base_fingerprint},
        "reference": plan.reference,
        "policy_init": plan.policy_start,
        "average": plan.average_kind,
        "dpo": {
            "save_steps": plan.save_steps,
            "max_steps": config.max_steps,
            "beta": config.beta,
            "learning_rate": config.learning_rate,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "bf16": config.bf16,
            "precompute_ref_log_probs": config.precompute_ref_log_probs,
            "max_length": config.max_length,
            "overrides": {
                key: _jsonable(value) for key, value in sorted(plan.config_overrides.items()) if key not in PRESENTATION_FIELDS
            },
        },
        "schedule": plan.bema_schedule.to_dict(),
        "lora": None,  # LoRA rounds: the LoraConfig fields, once they land
    }


_OPTION_NAMES = {"base_model.fingerprint": "--base-model (its weights)", "policy_init": "--policy-init"}


def plan_differences(old: dict, new: dict) -> list[str]:
    """The settings that differ between two plan records, each as `--option was X, now Y`."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    found = []
    for key in sorted(set(flat_old) | set(flat_new)):
        if key in ("base_model.path", "average") or flat_old.get(key) == flat_new.get(key):  # (average follows reference)
            continue
        if key in _OPTION_NAMES:
            name = _OPTION_NAMES[key]
        elif key.startswith("dpo.overrides."):
            name = f"--config-set {key.removeprefix('dpo.overrides.')}"
        else:
            last = key.rsplit(".", 1)[-1]
            name = "--config-set max_length" if last == "max_length" else f"--{last.replace('_', '-')}"
        was, now = (_shown(flat.get(key, "not set")) for flat in (flat_old, flat_new))
        found.append(f"{name} was {was}, now {now}")
    return found


def _flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any) -> str:
    text = str(value)
    return text[:16] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text  # a sha256
