"""The plan of an iterative DPO run (`bema-offline iterate`), and its fingerprint.

`IteratePlan` holds the options. `plan_record` is what `rounds.json` keeps of them: the settings that decide every
round's weights, with TRL's defaults resolved, the averaging method with all its parameters and, for LoRA rounds, the
adapter's settings, so that a rerun can be compared with the run it continues (`plan_differences` names what
differs, as options).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BemaError, DataError, UsageError, steps_text
from ..methods.base import Method
from ..methods.registry import METHODS, make_method
from ..methods.schedule import BEMASchedule
from ..sources.peft import ADAPTER_CONFIG, check_init, read_adapter_config
from .dpo import LORA_OPTIONS, _jsonable, dpo_config

FIXED_REFERENCES = ("last", "base")  # the references that are not an average: round k's last checkpoint, the base
# Every averaging method of bema-average, and the two fixed references; the default first (the CLI keeps the same).
REFERENCES = ("bema", "ema", *FIXED_REFERENCES, *(name for name in METHODS if name not in ("bema", "ema")))
POLICY_INITS = ("reference", "last")
# DPOConfig fields that would break resuming or the averages (on top of what `bema-offline dpo` refuses).
ITERATE_REFUSED_FIELDS = {
    "save_only_model": "iterate keeps the optimizer state of the newest checkpoint, to resume a killed round",
    "save_total_limit": "the average of each round needs all its checkpoints",
    "resume_from_checkpoint": "iterate resumes by itself: run the same command again",
}
# DPOConfig fields that change what a run prints, not what it computes: left out of the plan's fingerprint.
PRESENTATION_FIELDS = {"disable_tqdm", "report_to", "run_name", "log_level", "logging_dir", "logging_steps", "logging_first_step", "logging_strategy"}
# LoraConfig fields that the plan's record always shows (the others only when they differ from peft's defaults), and
# fields that do not decide the weights: TRL sets the base model's name, and peft its version.
LORA_SHOWN = ("r", "lora_alpha", "lora_dropout", "target_modules")
LORA_NOT_IN_PLAN = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}


@dataclass(frozen=True)
class IteratePlan:
    """Everything that decides what an iterative run computes, plus how it reports (eval data, Hub).

    Args:
        base_model (`Path`): round 1's policy and reference (a model folder).
        datasets (`tuple[Path, ...]`): preference data, one for every round or one per round.
        rounds (`int`): the number of rounds K.
        workdir (`Path`): where the rounds, averages and `rounds.json` go.
        save_steps (`int`): checkpoint cadence of each round, also the default `update_freq` of its average.
        reference (`str`, defaults to "bema"): round k+1's reference: a method of `bema_offline.methods` ("bema",
            "ema", "dema", "ouema", "uniform", "power-ema", "wsm", "expo"), i.e. that average of round k's
            checkpoints, or "last" (round k's last checkpoint) or "base" (the base model every round).
        policy_init (`str`, *optional*): "reference" or "last"; defaults to "last" with reference "base" (else every
            round would start from the base again), "reference" otherwise.
        max_steps, beta, learning_rate, per_device_train_batch_size, bf16, precompute_ref_log_probs: each round's
            DPO settings (TRL's defaults when None).
        config_overrides (`dict`): any other DPOConfig fields.
        method (`Method`, *optional*): each round's average, with its parameters: the reference's method when the
            reference is an average (its name must be `reference`), else what the rounds table and the Hub show.
            Default: `reference`'s method (BEMA with "last" and "base") with TRL's defaults and `update_freq` =
            `save_steps`. A schedule's `update_freq` and `update_after` must fall on the saved checkpoints
            (multiples of `save_steps`).
        eval_data (`Path`, *optional*): held-out data evaluated after each round, whose columns choose the metrics
            (see `rounds_eval`); not part of the plan's fingerprint: it may change between runs, and the scores are
            then computed again.
        push_to_hub (`str`, *optional*): ORG/NAME; each round's average goes to branch `round-K`.
        private (`bool`, defaults to False): create the Hub repo private.
        lora (`peft.LoraConfig`, *optional*): LoRA rounds: each round trains an adapter on its policy (see
            `train.dpo.lora_config`); the round's average merges its adapter checkpoints onto the policy into a full
            model folder, and so does the round's last checkpoint where the next round or the evaluation uses it.
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
    method: Method | None = None
    eval_data: Path | None = None
    push_to_hub: str | None = None
    private: bool = False
    lora: Any | None = None

    @property
    def policy_start(self) -> str:
        if self.policy_init is not None:
            return self.policy_init
        return "last" if self.reference == "base" else "reference"

    @property
    def average_method(self) -> Method:
        """Each round's average: `method`, or the reference's method (BEMA for "last" and "base") with TRL's
        defaults on the rounds' save grid.

        Raises:
            `UsageError`: a method that needs a parameter (`power-ema` without `sigma_rel`).
        """
        if self.method is not None:
            return self.method
        name = "bema" if self.reference in FIXED_REFERENCES else self.reference
        return make_method(name, {}, schedule=BEMASchedule(update_freq=self.save_steps), where=f"--reference {name}")

    @property
    def training_options(self) -> dict[str, object]:
        """The settings every round trains with, as `dpo_config` and `train_dpo` take them."""
        return {
            "beta": self.beta,
            "learning_rate": self.learning_rate,
            "max_steps": self.max_steps,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "save_steps": self.save_steps,
            "bf16": self.bf16,
            "precompute_ref_log_probs": self.precompute_ref_log_probs,
        }

    def expected_steps(self) -> list[int] | None:
        """The checkpoints each round will save, when `max_steps` says how long a round is (else None): every
        `save_steps`, and the last step (the Trainer saves at the end of training)."""
        if self.max_steps is None or self.max_steps <= 0:
            return None
        return sorted({*range(self.save_steps, self.max_steps + 1, self.save_steps), self.max_steps})

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
        for key in self.config_overrides:
            if key in ITERATE_REFUSED_FIELDS:
                raise UsageError(f"--config-set {key}: not allowed, {ITERATE_REFUSED_FIELDS[key]}")
        self.check_method()
        self.check_lora()

    def check_lora(self) -> None:
        """Refuse, before anything trains, LoRA settings whose checkpoints the round's average could not merge: the
        adapter config every checkpoint will hold is written as peft writes it and read as `bema-average` reads it.
        The adapter must start at zero (B·A = 0, peft's default init), so that θ0 of each round's average is the
        weights the round started from."""
        if self.lora is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            self.lora.save_pretrained(folder)
            path = Path(folder) / ADAPTER_CONFIG
            try:
                check_init(read_adapter_config(path), base_is_theta0=True)
            except DataError as e:
                reason = str(e).removeprefix(f"{path}: ").split(";")[0]
                init = self.lora.init_lora_weights
                if "init_lora_weights" in reason:
                    raise UsageError(
                        f"--lora-set init_lora_weights={str(init).lower()}: {reason}, and each round's average needs θ0 = "
                        "the weights the round started from; use an init that starts at zero (peft's default, or gaussian)"
                    ) from None
                raise UsageError(f"--lora-set: {reason}; leave that setting out") from None

    def check_method(self) -> None:
        """Refuse, before anything trains, an average that the rounds' checkpoints could not give: a method other
        than the reference's, update steps or θ0 off the save grid, and, when `max_steps` fixes the checkpoints,
        anything the method itself refuses on them (a window without a checkpoint, `expo`'s `ref_step` not saved)."""
        method = self.average_method
        if self.reference not in FIXED_REFERENCES and method.name != self.reference:
            raise UsageError(f"--reference {self.reference} takes its own method's average, but the method given is {method.name}")
        grid = self.save_steps
        schedule = getattr(method, "schedule", None)
        if isinstance(schedule, BEMASchedule):
            if schedule.convention == "trl" and schedule.update_freq % grid:
                raise UsageError(
                    f"--update-freq {schedule.update_freq}: the update steps must be saved checkpoints, and each round "
                    f"saves one every --save-steps {grid} steps; use a multiple of {grid}"
                )
            if schedule.update_after % grid:
                raise UsageError(
                    f"--update-after {schedule.update_after}: θ0 would be checkpoint-{schedule.update_after}, which no "
                    f"round saves (one every --save-steps {grid} steps); use 0 (the round's start) or a multiple of {grid}"
                )
        ref_step = getattr(method, "ref_step", None)
        if isinstance(ref_step, int) and ref_step % grid:  # (the last step, saved off the grid too, cannot be θ_ref)
            raise UsageError(f"--ref-step {ref_step}: no round saves checkpoint-{ref_step} (one every --save-steps {grid} steps); use a multiple of {grid}")
        steps = self.expected_steps()
        if steps is not None:
            try:
                method.weights(steps, base=True)
            except BemaError as e:
                raise UsageError(
                    f"--reference {self.reference}: each round saves checkpoints {steps_text(steps)} (--save-steps "
                    f"{grid}, --max-steps {self.max_steps}), and {e}"
                ) from None


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
    config = dpo_config(plan.workdir / "round-1", overrides=plan.config_overrides, **plan.training_options)
    return {
        "base_model": {"path": str(plan.base_model), "fingerprint": base_fingerprint},
        "reference": plan.reference,
        "policy_init": plan.policy_start,
        "average": plan.average_method.to_dict(),
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
        "lora": lora_record(plan.lora),
    }


def lora_record(lora: Any | None) -> dict | None:
    """What `rounds.json` keeps of a `peft.LoraConfig`: r, lora_alpha, lora_dropout and target_modules, then every
    other field whose value is not peft's default (so that leaving `--lora-set use_rslora=false` out is the same
    plan, and a field that a newer peft adds does not change it); None for full rounds."""
    if lora is None:
        return None
    from peft import LoraConfig

    settings = {key: _jsonable(value) for key, value in lora.to_dict().items() if key not in LORA_NOT_IN_PLAN}
    defaults = {key: _jsonable(value) for key, value in LoraConfig(task_type=lora.task_type).to_dict().items()}
    record = {key: settings.get(key) for key in LORA_SHOWN}
    record.update({key: value for key, value in sorted(settings.items()) if key not in record and value != defaults.get(key)})
    return record


_OPTION_NAMES = {
    "base_model.fingerprint": "--base-model (its weights)",
    "policy_init": "--policy-init",
    "average.method": "the average's method",
}


def upgraded_plan_record(record: dict) -> dict:
    """A plan record as this version writes it: the first `rounds.json` files held the average's kind ("bema" or
    "ema") and its schedule apart, which is `{"method": kind, **schedule}` now."""
    if isinstance(record.get("average"), str) and isinstance(record.get("schedule"), dict):
        upgraded = {key: value for key, value in record.items() if key != "schedule"}
        upgraded["average"] = {"method": record["average"], **record["schedule"]}
        return upgraded
    return record


def plan_differences(old: dict, new: dict) -> list[str]:
    """The settings that differ between two plan records, each as `--option was X, now Y`: the reference first,
    and the average's parameters only when the method is the same (another method's are another set)."""
    old, new = upgraded_plan_record(old), upgraded_plan_record(new)
    flat_old, flat_new = _flatten(old), _flatten(new)
    reference_changed = old.get("reference") != new.get("reference")
    method_changed = flat_old.get("average.method") != flat_new.get("average.method")
    keys = sorted(set(flat_old) | set(flat_new), key=lambda key: (key != "reference", key))
    found = []
    for key in keys:
        if key == "base_model.path" or flat_old.get(key) == flat_new.get(key):
            continue
        if key.startswith("average.") and (reference_changed or (method_changed and key != "average.method")):
            continue  # named by the reference (or the method) already: another method's parameters are another set
        if key in _OPTION_NAMES:
            name = _OPTION_NAMES[key]
        elif key.startswith("lora."):
            setting = key.removeprefix("lora.")
            name = LORA_OPTIONS.get(setting, f"--lora-set {setting}")
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
        if isinstance(value, dict) and value and prefix != "lora.":  # a LoraConfig field is one option, dict or not
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any) -> str:
    if value is None:
        return "not set"
    text = str(value)
    return text[:16] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text  # a sha256
