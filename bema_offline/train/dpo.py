"""One round of iterative DPO whose reference model is a BEMA average (the `bema-offline[dpo]` extra).

TRL's experimental `BEMACallback(update_ref_model=True)` swaps the DPO reference for the running BEMA during
training. The offline counterpart works round by round: round k trains and saves `checkpoint-N/` folders,
`bema-average` makes the BEMA of round k, and round k+1 trains against that average. This module runs one round:

- the reference is loaded from its folder on its own, in the dtype of its safetensors, frozen
  (`requires_grad_(False)`, eval mode), and never the policy object;
- its fingerprint (sha256 over every tensor) is checked against the folder's safetensors, before training and
  after it, so the reference is verifiably the averaged weights;
- with `precompute_ref_log_probs`, TRL computes the reference log-probs up front and the reference is then
  dropped, so it does not stay in memory during training;
- checkpoints land in `output_dir/checkpoint-N/` as safetensors, where the next `bema-average` reads them;
- with a `peft.LoraConfig` (`lora_config`, the `--lora-*` options), the policy trains a LoRA adapter on top of
  its starting point, against the same separate, verified reference: the iterative-DPO loop for LoRA users
  (round k's LoRA checkpoints, merged by `bema-average` into a full model, are round k+1's reference and policy
  base). Checkpoints then hold adapters, whose config names the policy's folder as their base model.

trl, transformers and datasets are imported only when a round runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import gc
import json
import os
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..errors import BemaError, DataError, UsageError, first_line
from ..files import write_new_file
from ..output.fingerprint import folder_fingerprint, tensors_fingerprint
from ..sources.run import find_checkpoints, load_source
from .preferences import load_preference_dataset

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RECORD_FILE = "bema_offline_dpo.json"
# DPOConfig fields that have their own option, and fields that would break what this module promises.
OWN_OPTIONS = {
    "output_dir": "--output-dir",
    "beta": "--beta",
    "learning_rate": "--learning-rate",
    "max_steps": "--max-steps",
    "per_device_train_batch_size": "--per-device-train-batch-size",
    "save_steps": "--save-steps",
    "bf16": "--bf16/--no-bf16",
    "precompute_ref_log_probs": "--precompute-ref-log-probs",
}
REFUSED_FIELDS = {
    "sync_ref_model": "it would mix the policy into the reference during training; the BEMA reference stays frozen",
    "save_strategy": "checkpoints must be saved every --save-steps steps, to fall on the next average's update steps",
    "save_safetensors": "the next bema-average reads safetensors checkpoints",
}


class MissingExtraError(BemaError):
    """trl, transformers or datasets is not installed."""

    exit_code = 1


def require_dpo_extra() -> None:
    """Import what DPO needs, or fail with one line that names the extra to install."""
    require_extra("bema-offline dpo", ("trl", "transformers", "datasets"))


def require_extra(what: str, modules: Sequence[str]) -> None:
    """Import `modules`, or fail with one line: `what` needs the missing ones, from the `dpo` extra."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}: pip install 'bema-offline[dpo]'")


@dataclass(frozen=True)
class DPOResult:
    """What a round produced.

    Args:
        output_dir (`Path`): where the checkpoints are.
        checkpoints (`list[int]`): the steps of the `checkpoint-N` folders written.
        reference_fingerprint (`str`): sha256 of the reference weights, equal to its folder's safetensors'.
        record (`dict`): the round's record, also written to `output_dir/bema_offline_dpo.json`.
    """

    output_dir: Path
    checkpoints: list[int]
    reference_fingerprint: str
    record: dict


@dataclass(frozen=True)
class RoundSetup:
    """A round prepared by `build_trainer`: the reference folder, its fingerprint and the round's record so far."""

    reference: Path
    fingerprint: str
    record: dict


# --- configuration -----------------------------------------------------------------------------------------


def parse_config_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn `KEY=VALUE` strings into DPOConfig fields, each value converted to its field's type.

    Values: numbers, `true`/`false`, `null` (or `none` where the field takes no strings), JSON lists or dicts
    (`[...]`, `{...}`), comma-separated lists, or plain strings.

    Raises:
        `UsageError`: an unknown field, one with its own option, a refused one, or a value of the wrong type.
    """
    from trl import DPOConfig

    return _parse_fields(
        pairs, DPOConfig, option="--config-set", example="warmup_steps=10", own=OWN_OPTIONS, refused=REFUSED_FIELDS, where="trl.DPOConfig"
    )


def _parse_fields(
    pairs: Sequence[str], config_class: type, *, option: str, example: str, own: dict[str, str], refused: dict[str, str], where: str
) -> dict[str, Any]:
    """`KEY=VALUE` strings of `option` as fields of the dataclass `config_class`, each value converted to its field's
    type; a field with an option of its own (`own`), a refused one (`refused`) or an unknown one is a `UsageError`."""
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    hints = typing.get_type_hints(config_class)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"{option} {pair!r}: write KEY=VALUE, e.g. {option} {example}")
        if key in own:
            raise UsageError(f"{option} {key}: use {own[key]} instead")
        if key in refused:
            raise UsageError(f"{option} {key}: not allowed, {refused[key]}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see the fields of {where}"
            raise UsageError(f"{option} {key}: {config_class.__name__} has no such field{hint}")
        values[key] = _convert(key, text.strip(), hints[key], option=option)
    return values


LORA_OPTIONS = {"r": "--lora-r", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout", "target_modules": "--lora-target-modules"}
LORA_REFUSED = {"task_type": "the policy is a causal language model (CAUSAL_LM)", "peft_type": "the adapter is a LoRA"}


def lora_config(
    *,
    r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    target_modules: str | None = None,
    pairs: Sequence[str] = (),
):
    """The `peft.LoraConfig` of a LoRA round: peft's defaults, then the options given, then `KEY=VALUE` pairs for
    any other field (`--lora-set`), each value converted to its field's type.

    Args:
        r, lora_alpha, lora_dropout (*optional*): `--lora-r`, `--lora-alpha`, `--lora-dropout`.
        target_modules (`str`, *optional*): `--lora-target-modules`: "all-linear", or module names separated by
            commas (default: peft's choice for the architecture).
        pairs (`Sequence[str]`): `--lora-set` values, e.g. `["use_rslora=true", "modules_to_save=lm_head"]`.

    Raises:
        `UsageError`: an unknown field, one with its own option, a value of the wrong type, or one that
            `LoraConfig` refuses.

    Example:

    ```python
    >>> config = lora_config(r=16, target_modules="all-linear", pairs=["use_rslora=true"])
    >>> result = train_dpo("runs/round1-bema", "prefs.jsonl", "runs/round2", lora=config, save_steps=100)
    ```
    """
    require_extra("LoRA training (--lora-*)", ("peft",))
    from peft import LoraConfig

    settings: dict[str, Any] = {"task_type": "CAUSAL_LM"}
    given = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
    settings.update({key: value for key, value in given.items() if value is not None})
    if target_modules is not None:
        names = [name.strip() for name in target_modules.split(",") if name.strip()]
        settings["target_modules"] = "all-linear" if names == ["all-linear"] else names
    settings.update(
        _parse_fields(pairs, LoraConfig, option="--lora-set", example="use_rslora=true", own=LORA_OPTIONS, refused=LORA_REFUSED, where="peft.LoraConfig")
    )
    try:
        return LoraConfig(**settings)
    except (ValueError, TypeError) as e:
        raise UsageError(f"peft.LoraConfig refused the settings: {first_line(e)}") from e


def _convert(key: str, text: str, hint: Any, *, option: str = "--config-set") -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    lowered = text.lower()
    # "null" is None; "none" too, unless the field takes strings (report_to=none is the string "none")
    if type(None) in options and (lowered == "null" or (lowered == "none" and str not in options)):
        return None
    if bool in options and lowered in ("true", "false", "yes", "no", "1", "0"):
        return lowered in ("true", "yes", "1")
    for kind in (int, float):
        if kind in options:
            try:
                return kind(text)
            except ValueError:
                pass
    for kind in options:
        origin = typing.get_origin(kind) or kind
        if origin is list and (str not in options or text.startswith("[") or "," in text):
            item_type = (typing.get_args(kind) or (str,))[0]
            try:
                items = json.loads(text) if text.startswith("[") else [i.strip() for i in text.split(",") if i.strip()]
                return [float(item) if item_type is float else item for item in items]
            except (TypeError, ValueError):
                break
        if origin is dict and text.startswith("{"):
            try:
                return json.loads(text)
            except ValueError as e:
                raise UsageError(f"{option} {key}: {text!r} is not valid JSON ({e})") from None
    if any(kind is str or typing.get_origin(kind) is typing.Literal or _is_enum(kind) for kind in options):
        return text
    raise UsageError(f"{option} {key}={text}: expected {_type_name(hint)}")


def _is_enum(option: Any) -> bool:
    import enum

    return isinstance(option, type) and issubclass(option, enum.Enum)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def dpo_config(
    output_dir: str | Path,
    *,
    beta: float | None = None,
    learning_rate: float | None = None,
    max_steps: int | None = None,
    per_device_train_batch_size: int | None = None,
    save_steps: int | None = None,
    bf16: bool | None = None,
    precompute_ref_log_probs: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool | None = None,
):
    """The round's `DPOConfig`: TRL's defaults, then checkpoints every `save_steps` steps with the model only
    (`save_only_model=True`, overridable), then the options given, then `overrides`.

    `bf16=None` uses bf16 mixed precision when a CUDA GPU supports it, fp32 otherwise. `progress=False` turns the
    Trainer's progress bar off (`disable_tqdm`, unless `overrides` sets it): it then prints its logs as lines.
    """
    from trl import DPOConfig

    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    settings: dict[str, Any] = {"output_dir": str(output_dir), "save_strategy": "steps", "save_only_model": True, "bf16": bf16}
    given = {
        "beta": beta,
        "learning_rate": learning_rate,
        "max_steps": max_steps,
        "per_device_train_batch_size": per_device_train_batch_size,
        "save_steps": save_steps,
    }
    settings.update({key: value for key, value in given.items() if value is not None})
    settings["precompute_ref_log_probs"] = precompute_ref_log_probs
    if progress is not None:
        settings["disable_tqdm"] = not progress
    settings.update(overrides or {})
    try:
        with warnings.catch_warnings():
            # TRL's own default gradient_checkpointing=True trips transformers' deprecation warning on every run
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
            return DPOConfig(**settings)
    except (ValueError, TypeError) as e:
        raise UsageError(f"DPOConfig refused the settings: {first_line(e)}") from e


# --- the reference model -----------------------------------------------------------------------------------


def load_reference(folder: str | Path, *, log: Callable[[str], None] = print):
    """Load a model folder as a frozen reference and check it is the folder's weights, bit for bit.

    The model is loaded in the dtype of the folder's safetensors (not the config's), its parameters get
    `requires_grad=False`, and it is put in eval mode.

    Returns:
        `(PreTrainedModel, str)`: the model and its fingerprint (that of the folder's safetensors).

    Raises:
        `DataError`: no safetensors weights, or the loaded model differs from them.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    source = load_source(folder, 0)
    float_dtypes = [info.torch_dtype for info in source.tensors.values() if info.is_float]
    dtype = max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    expected = folder_fingerprint(folder)
    check_reference(model, folder, expected, when="after loading")
    log(f"reference {folder}: sha256 {expected} (equal to its safetensors)")
    return model, expected


def reference_fingerprint(model, names: Sequence[str]) -> str:
    """The fingerprint of a model's tensors named `names` (those of its folder).

    A model tensor the folder lacks is allowed only if it shares storage with one the folder has (tied
    embeddings); anything else would have been freshly initialised, not loaded.
    """
    state = model.state_dict()
    missing = [name for name in names if name not in state]
    if missing:
        raise DataError(f"tensor {missing[0]!r} of the reference folder is not in the loaded model; transformers renamed or dropped it")
    folder_pointers = {state[name].data_ptr() for name in names}
    extra = [name for name in state if name not in set(names) and state[name].data_ptr() not in folder_pointers]
    if extra:
        raise DataError(f"the reference model has tensor {extra[0]!r}, which its folder lacks: it would be randomly initialised")
    return tensors_fingerprint({name: state[name] for name in names})


def check_reference(model, folder: Path, expected: str, *, when: str) -> None:
    names = list(load_source(folder, 0).tensors)
    got = reference_fingerprint(model, names)
    if got != expected:
        raise DataError(
            f"the reference model {when} (sha256 {got[:16]}) differs from {folder}'s safetensors (sha256 "
            f"{expected[:16]}); it must be exactly the averaged weights"
        )


# --- one round ---------------------------------------------------------------------------------------------


def train_dpo(
    ref_model: str | Path,
    dataset: str | Path,
    output_dir: str | Path,
    *,
    policy: str | Path | PreTrainedModel | None = None,
    beta: float | None = None,
    learning_rate: float | None = None,
    max_steps: int | None = None,
    per_device_train_batch_size: int | None = None,
    save_steps: int | None = None,
    bf16: bool | None = None,
    precompute_ref_log_probs: bool = False,
    config_overrides: dict[str, Any] | None = None,
    lora: Any | None = None,
    resume_from_checkpoint: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> DPOResult:
    """Run one DPO round with TRL against a frozen reference, saving `checkpoint-N/` folders for `bema-average`.

    Args:
        ref_model (`str | Path`): the reference model folder, e.g. the BEMA of the round before.
        dataset (`str | Path`): preference data (see `load_preference_dataset`).
        output_dir (`str | Path`): where the `checkpoint-N/` folders go; it must not hold checkpoints already.
        policy (`str | Path | PreTrainedModel`, *optional*): the policy's starting point; defaults to the
            reference's folder (loaded again, as a separate object).
        beta, learning_rate, max_steps, per_device_train_batch_size (*optional*): DPO settings; TRL's defaults.
        save_steps (`int`, *optional*): checkpoint every this many steps; set it to the next average's
            `update_freq` so the checkpoints fall on its update steps.
        bf16 (`bool`, *optional*): bf16 mixed precision; defaults to on when a CUDA GPU supports it.
        precompute_ref_log_probs (`bool`, defaults to False): compute the reference log-probs before training
            and drop the reference model.
        config_overrides (`dict`, *optional*): any other DPOConfig fields (see `parse_config_overrides`).
        lora (`peft.LoraConfig`, *optional*): train a LoRA adapter on the policy (see `lora_config`); the
            checkpoints then hold adapters, which `bema-average` merges onto the policy's folder.
        resume_from_checkpoint (`str | Path`, *optional*): a `checkpoint-N` folder in `output_dir`, written by an
            interrupted run of the same round with its optimizer state (`save_only_model=False`); training goes on
            from there, through the Trainer's own `resume_from_checkpoint`.
        callbacks (`Sequence[TrainerCallback]`, *optional*): more callbacks for the Trainer.
        progress (`bool`, *optional*): the Trainer's progress bar; None leaves TRL's default, False prints the
            Trainer's logs as lines instead (for a log file).
        log (`Callable[[str], None]`, defaults to print): receives progress lines.

    Returns:
        `DPOResult`

    Example:

    ```python
    >>> result = train_dpo("runs/round1-bema", "prefs.jsonl", "runs/round2", save_steps=100, max_steps=1000)
    >>> result.checkpoints[:3]
    [100, 200, 300]
    ```
    """
    trainer, setup = build_trainer(
        ref_model,
        dataset,
        output_dir,
        policy=policy,
        beta=beta,
        learning_rate=learning_rate,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        save_steps=save_steps,
        bf16=bf16,
        precompute_ref_log_probs=precompute_ref_log_probs,
        config_overrides=config_overrides,
        lora=lora,
        resume=resume_from_checkpoint is not None,
        progress=progress,
        log=log,
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    if resume_from_checkpoint is not None:
        log(f"resuming training from {resume_from_checkpoint}")
        trainer.train(resume_from_checkpoint=str(resume_from_checkpoint))
    else:
        trainer.train()
    if trainer.ref_model is not None:
        check_reference(trainer.ref_model, setup.reference, setup.fingerprint, when="after training")
        log("reference unchanged by training (fingerprint checked again)")
    output_dir = Path(output_dir)
    checkpoints = sorted(find_checkpoints(output_dir))
    record = {
        "tool": "bema-offline dpo",
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **setup.record,
        "global_step": trainer.state.global_step,
        "checkpoints": checkpoints,
        "resumed_from": Path(resume_from_checkpoint).name if resume_from_checkpoint is not None else None,
    }
    write_json_atomically(output_dir / RECORD_FILE, record)
    log(
        f"wrote checkpoints {', '.join(map(str, checkpoints))} to {output_dir}; next: bema-average {output_dir} "
        f"--base-model {record['policy']['path'] or '<policy folder>'} --update-freq {record['dpo']['save_steps']}"
    )
    return DPOResult(output_dir, checkpoints, setup.fingerprint, record)


def build_trainer(
    ref_model: str | Path,
    dataset: str | Path,
    output_dir: str | Path,
    *,
    policy: str | Path | PreTrainedModel | None = None,
    config_overrides: dict[str, Any] | None = None,
    lora: Any | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    **settings: Any,
):
    """Everything `train_dpo` does before `trainer.train()`: returns `(DPOTrainer, RoundSetup)`.

    `settings` are `dpo_config`'s keyword arguments; `lora` a `peft.LoraConfig` for the policy (TRL wraps it; the
    reference stays the separate, verified model, not the policy with its adapter disabled). The trainer's `ref_model` is the verified frozen
    reference, or None with `precompute_ref_log_probs` (the log-probs are in `trainer.train_dataset`).
    `output_dir` must hold no checkpoints, unless `resume` (the caller resumes from one of them).
    """
    require_dpo_extra()
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    output_dir = Path(output_dir)
    if not resume and output_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in output_dir.iterdir()):
        raise UsageError(f"--output-dir {output_dir} already holds checkpoint folders; use a new folder for each round")
    ref_folder = Path(ref_model)
    if not ref_folder.is_dir():
        raise DataError(f"--ref-model {ref_folder}: no such folder; pass a model folder, e.g. a bema-average output")
    if isinstance(policy, (str, Path)) and Path(policy).exists() and not Path(policy).is_dir():
        raise DataError(f"--policy {policy}: not a folder")
    config = dpo_config(output_dir, overrides=config_overrides, **settings)
    train_dataset, data_format = load_preference_dataset(dataset)
    log(f"dataset {dataset}: {len(train_dataset)} {data_format} preference pairs")

    policy = ref_folder if policy is None else policy
    policy_path = str(policy) if isinstance(policy, (str, Path)) else None
    tokenizer_source = policy_path if policy_path and (Path(policy_path) / "tokenizer_config.json").is_file() else ref_folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as e:  # no tokenizer files: a bema-average output of checkpoints saved without one
        raise DataError(
            f"{tokenizer_source}: cannot load its tokenizer ({first_line(e)}); copy the tokenizer files of the base model "
            "into it, or pass as --policy a folder that has them"
        ) from e
    reference, fingerprint = load_reference(ref_folder, log=log)
    if config.save_steps and config.max_steps > 0 and config.max_steps % config.save_steps:
        log(f"note: max_steps {config.max_steps} is not a multiple of save_steps {config.save_steps}; the last "
            "checkpoint falls off the BEMA update steps and the next average ignores it")

    trainer = DPOTrainer(
        model=policy_path if policy_path else policy,
        ref_model=reference,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    if lora is not None:
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        log(f"policy: a LoRA adapter (r={lora.r}, lora_alpha={lora.lora_alpha}), {trainable} trainable parameters")
    if trainer.ref_model is trainer.model:  # DPOTrainer refuses this too; the reference must never be the policy
        raise DataError("the reference model is the policy object; load them separately")
    if config.precompute_ref_log_probs:
        trainer.ref_model = None  # the log-probs are in the dataset now; free the reference
        del reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log("reference log-probs precomputed; the reference model is released")
    else:
        check_reference(trainer.ref_model, ref_folder, fingerprint, when="inside the trainer")
    record = {
        "reference": {"path": str(ref_folder), "fingerprint": fingerprint, "average": _average_summary(ref_folder)},
        "policy": {"path": policy_path},
        "dataset": {"path": str(dataset), "rows": len(train_dataset), "format": data_format},
        "dpo": {
            "beta": config.beta,
            "learning_rate": config.learning_rate,
            "max_steps": config.max_steps,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "save_steps": config.save_steps,
            "bf16": config.bf16,
            "precompute_ref_log_probs": config.precompute_ref_log_probs,
            "overrides": {key: _jsonable(value) for key, value in (config_overrides or {}).items()},
        },
        "lora": None if lora is None else {key: _jsonable(value) for key, value in lora.to_dict().items()},
    }
    return trainer, RoundSetup(ref_folder, fingerprint, record)


def write_json_atomically(path: Path, content: dict) -> None:
    """Write a JSON file through a temporary file and a rename, so that a killed run never leaves it half written."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # (a leftover of a killed run, or a link: removed by name, never written through)
    write_new_file(temporary, (json.dumps(content, indent=2) + "\n").encode(), fsync=True)
    os.replace(temporary, path)


def _average_summary(folder: Path) -> dict | None:
    """What the reference's `bema_offline.json` says, if it is a bema-offline output."""
    try:
        record = json.loads((folder / "bema_offline.json").read_text())
    except (OSError, ValueError):
        return None
    return {key: record.get(key) for key in ("kind", "method", "step", "run_dir", "schedule", "base_model")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


