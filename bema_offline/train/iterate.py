"""Iterative DPO: K rounds of TRL DPO, each against an average of the round before, resumable at any point.

Round 1 trains from the base model against the base. Each round's checkpoints are averaged by the plan's method
(BEMA by default, with update_freq = save_steps and θ0 = the weights the round started from; any method of
`bema_offline.methods` with its parameters), and round k+1's reference is, as `reference` says, round k's average
(a method's name), its last checkpoint (`last`) or always the base (`base`, plain multi-round DPO). Round k+1's
policy starts from its reference or from round k's last checkpoint (`policy_init`).

LoRA rounds (`lora`) train an adapter on the round's policy. Their checkpoints hold adapters, and the round's average
merges them onto the policy (W0 + s·Σ wᵢ·Bᵢ·Aᵢ, `bema-average`'s merged output), so that the reference and the
policy of every round stay full model folders. Where the next round or the evaluation uses the last checkpoint, it
is merged too (`round-K-last/`: the same merge with all the weight on that checkpoint).

Everything lands under the work folder:

    rounds.json            the plan, and each round as it finishes (rewritten atomically)
    rounds.md, rounds.png  the rounds table, and the evaluation metrics per round (with eval data)
    round-K/               round K's checkpoint-N/ folders; only the newest keeps the optimizer, scheduler and RNG
                           state that resuming needs
    round-K-bema/          round K's average, named after its method (round-K-uniform/, round-K-power-ema/, ...)
    round-K-last/          LoRA rounds: round K's last checkpoint merged, where the next round or the evaluation uses it

Running the same plan again on the same folder continues where it stopped: a round killed while training resumes
from its newest complete checkpoint through the Trainer's `resume_from_checkpoint` (the result is bit-identical
on the same machine), an average killed while writing reuses its finished shards, and finished rounds are reused
once the fingerprints of their averages and checkpoints match `rounds.json`. A plan that differs (an option, the
averaging method or one of its parameters, the base model's weights, a round's data) is refused with one line
naming the difference. More rounds than before extend a finished run.

With eval data, each round's reference, last checkpoint and average are evaluated with `bema_offline.eval` (see
`rounds_eval`). trl, transformers and datasets (the `dpo` extra) are imported only when a round runs.
"""

from __future__ import annotations

import copy
import datetime
import fcntl
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..api import average
from ..errors import DataError, UsageError, first_line
from ..methods.windows import Uniform
from ..output import hub
from ..output.fingerprint import folder_fingerprint
from ..sources.peft import is_adapter_folder
from ..sources.run import find_checkpoints
from .checkpoints import adapter_fingerprint, prepare_resume, prune_resume_state, resume_state_pruner
from .dpo import RECORD_FILE, require_dpo_extra, train_dpo, write_json_atomically
from .rounds_eval import check_eval_data, evaluate_round, last_model
from .rounds_plan import IteratePlan, data_fingerprint, plan_differences, plan_record, upgraded_plan_record
from .rounds_report import TABLE_FILE, average_title, rounds_card, rounds_table, write_rounds_table

__all__ = ["IteratePlan", "data_fingerprint", "run_rounds"]

ROUNDS_FILE = "rounds.json"
LOCK_FILE = ".bema-iterate.lock"


# --- the work folder --------------------------------------------------------------------------------------------


class WorkdirLock:
    """An exclusive lock on the work folder for the whole run, so that two runs never share one."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        try:  # (never through a link: the lock is written below)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DataError(f"{self.path}: cannot open the work folder's lock ({e.strerror or e}); if it is a link, remove it") from e
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:  # a hard link to another file: not ours to write
            os.close(fd)
            raise DataError(f"{self.path}: not the lock file bema-offline makes (a link, or not a plain file); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"--workdir {self.path.parent} is in use by another bema-offline iterate run (pid {holder}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def read_rounds(workdir: Path) -> dict | None:
    """The work folder's `rounds.json`, or None when there is none."""
    path = workdir / ROUNDS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("rounds"), list) or "plan" not in record:
            raise ValueError("not a rounds record")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); it was not written by bema-offline iterate, use a new --workdir") from e
    return record


# --- the rounds -------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One invocation: the plan, its record, and what it has computed so far."""

    plan: IteratePlan
    record: dict
    log: Callable[[str], None]
    progress: bool
    fingerprints: dict[str, str] = field(default_factory=dict)  # folder -> fingerprint, within this invocation
    push_token: str | None = None
    hub_api: Any = None

    def fingerprint(self, folder: Path) -> str:
        """A model folder's fingerprint (`output.fingerprint`), or a LoRA checkpoint's (its adapter's files)."""
        key = str(folder)
        if key not in self.fingerprints:
            self.fingerprints[key] = adapter_fingerprint(folder) if is_adapter_folder(folder) else folder_fingerprint(folder)
        return self.fingerprints[key]

    def save(self) -> None:
        self.record["updated"] = _now()
        write_json_atomically(self.plan.workdir / ROUNDS_FILE, self.record)


def run_rounds(plan: IteratePlan, *, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run (or continue) an iterative DPO plan; returns the `rounds.json` record.

    Args:
        plan (`IteratePlan`): the rounds to run.
        log (`Callable[[str], None]`, defaults to print): receives one line per round and phase.
        progress (`bool`, defaults to False): show the averaging's progress bars.

    Returns:
        `dict`: the record written to `WORKDIR/rounds.json`.

    Raises:
        `UsageError`: bad settings, or a work folder that holds another plan (the line names what differs).
        `DataError`: unreadable data, or a reused folder whose fingerprint no longer matches its record.

    Example:

    ```python
    >>> plan = IteratePlan(Path("base"), (Path("prefs.jsonl"),), rounds=3, workdir=Path("runs/iter"), save_steps=100)
    >>> record = run_rounds(plan)
    >>> record["rounds"][-1]["average"]["path"]
    'runs/iter/round-3-bema'
    >>> from bema_offline.train.dpo import lora_config  # LoRA rounds: each round's average merged, a full model
    >>> lora_plan = IteratePlan(
    ...     Path("base"), (Path("prefs.jsonl"),), rounds=3, workdir=Path("runs/iter-lora"), save_steps=100,
    ...     lora=lora_config(r=16, target_modules="all-linear"),
    ... )
    >>> record = run_rounds(lora_plan)
    ```
    """
    plan.check()
    require_dpo_extra()
    token = None
    if plan.push_to_hub:
        hub.check_repo_id(plan.push_to_hub)
        token = hub.find_token()  # a missing token fails now, not after hours of training
    workdir = plan.workdir
    existing = read_rounds(workdir) if workdir.is_dir() else None
    if existing is None and workdir.is_dir() and any(p.name != LOCK_FILE for p in workdir.iterdir()):
        raise UsageError(f"--workdir {workdir} holds files but no {ROUNDS_FILE}; choose a new or empty folder")
    for k in range(1, plan.rounds + 1):  # every round's data must be there before anything starts
        path = plan.dataset_for_round(k)
        if not path.exists():
            raise DataError(f"--dataset {path}: no such file or folder")
    if not plan.base_model.is_dir():
        raise DataError(f"--base-model {plan.base_model}: no such folder; pass a model folder")
    if plan.eval_data is not None:
        if not plan.eval_data.exists():
            raise DataError(f"--eval-data {plan.eval_data}: no such file or folder")
        check_eval_data(plan.eval_data)
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir):
        run = _Run(plan, existing or {}, log, progress, push_token=token)
        base_fingerprint = run.fingerprint(plan.base_model)
        wanted = plan_record(plan, base_fingerprint)
        if existing is None:
            run.record = {
                "tool": "bema-offline iterate",
                "version": __version__,
                "created": _now(),
                "plan": wanted,
                "rounds": [],
                "in_progress": None,
            }
            run.save()
        else:
            differences = plan_differences(existing["plan"], wanted)
            if differences:
                more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
                raise UsageError(
                    f"--workdir {workdir} holds a run with another plan: {differences[0]}{more}; "
                    "rerun with the options of that run, or use a new --workdir"
                )
            done = len(existing["rounds"])
            if done > plan.rounds:
                raise UsageError(f"--rounds {plan.rounds}: --workdir {workdir} already holds {done} finished rounds; pass --rounds {done} or more")
            run.record["version"] = __version__
            run.record["plan"] = upgraded_plan_record(existing["plan"])
        if plan.push_to_hub:
            run.hub_api = hub.make_api(token)
        for k in range(1, plan.rounds + 1):
            if k <= len(run.record["rounds"]):
                _reuse_round(run, k)
            else:
                _run_round(run, k)
            entry = run.record["rounds"][k - 1]
            if plan.eval_data is not None:
                _evaluate_round(run, entry)
            if plan.push_to_hub:
                _push_round(run, entry)
            write_rounds_table(run.record, workdir)
        log(rounds_table(run.record, workdir))
        last = run.record["rounds"][-1]["average"]["path"]
        log(f"done: {plan.rounds} rounds; the last average is {last}; see {workdir / ROUNDS_FILE} and {workdir / TABLE_FILE}")
    return run.record


def _inputs_of_round(run: _Run, k: int) -> tuple[dict, dict]:
    """Round k's reference and policy, `{path, fingerprint, kind}` and `{path, fingerprint}`, from the rounds before."""
    plan = run.plan
    base = {"path": str(plan.base_model), "fingerprint": run.fingerprint(plan.base_model)}
    if k == 1:
        return {**base, "kind": "base"}, dict(base)
    previous = run.record["rounds"][k - 2]
    uses_last = plan.reference == "last" or plan.policy_start == "last"
    last = {key: last_model(previous)[key] for key in ("path", "fingerprint")} if uses_last else {}
    if plan.reference == "base":
        reference = base
    elif plan.reference == "last":
        reference = last
    else:  # the reference is the round's average, whatever its method
        reference = {"path": previous["average"]["path"], "fingerprint": previous["average"]["fingerprint"]}
    policy = dict(reference) if plan.policy_start == "reference" else dict(last)
    return {**reference, "kind": plan.reference}, policy


def _check_fingerprint(run: _Run, recorded: dict, what: str) -> None:
    path = Path(recorded["path"])
    if not path.is_dir():
        raise DataError(f"{path}: {what} is gone; restore it, or use a new --workdir")
    found = run.fingerprint(path)
    if found != recorded["fingerprint"]:
        raise DataError(
            f"{path}: {what} changed since {ROUNDS_FILE} recorded it (sha256 {found[:16]}, recorded "
            f"{recorded['fingerprint'][:16]}); restore it, or use a new --workdir"
        )


def _check_dataset(run: _Run, k: int, recorded: dict) -> dict:
    path = run.plan.dataset_for_round(k)
    current = {"path": str(path), "fingerprint": data_fingerprint(path)}
    if current["fingerprint"] != recorded["fingerprint"]:
        raise UsageError(
            f"--dataset {path}: round {k} was trained on other data ({recorded['path']}, sha256 "
            f"{recorded['fingerprint'][:16]}); rerun with that data, or use a new --workdir"
        )
    return current


def _reuse_round(run: _Run, k: int) -> None:
    """A finished round: check its data and the fingerprints of what the next rounds use, and go on."""
    entry = run.record["rounds"][k - 1]
    _check_dataset(run, k, entry["dataset"])
    _check_fingerprint(run, entry["average"], f"round {k}'s average")
    if _merges_last_checkpoint(run.plan) and "last_merged" not in entry["training"]:
        _merge_last_checkpoint(run, entry)  # --eval-data given now, after the round: it evaluates the merge
        run.save()
    if k < run.plan.rounds and (run.plan.reference == "last" or run.plan.policy_start == "last"):
        _check_fingerprint(run, last_model(entry), f"round {k}'s last checkpoint")
    run.log(f"round {k}/{run.plan.rounds}: finished before; reusing {entry['average']['path']} (fingerprint checked)")


def _run_round(run: _Run, k: int) -> None:
    """Train round k (or resume it), average it, and record it."""
    plan, log = run.plan, run.log
    rounds = plan.rounds
    reference, policy = _inputs_of_round(run, k)
    dataset_path = plan.dataset_for_round(k)
    dataset = {"path": str(dataset_path), "fingerprint": data_fingerprint(dataset_path)}
    started = run.record.get("in_progress")
    if started and started.get("round") == k:
        _check_dataset(run, k, started["dataset"])
        if (started["reference"]["fingerprint"], started["policy"]["fingerprint"]) != (reference["fingerprint"], policy["fingerprint"]):
            raise DataError(f"round {k} started from other models than round {k - 1} recorded; use a new --workdir")
    run.record["in_progress"] = {"round": k, "dataset": dataset, "reference": reference, "policy": policy}
    run.save()

    run_dir = plan.workdir / f"round-{k}"
    training = _read_training_record(run_dir)
    if training is not None:
        log(f"round {k}/{rounds}: training finished before; reusing {run_dir}")
    else:
        resume = prepare_resume(run_dir)
        adapter = "a LoRA adapter on " if plan.lora is not None else ""
        log(f"round {k}/{rounds}: training: policy {adapter}{policy['path']}, reference {reference['path']}, data {dataset_path} -> {run_dir}")
        result = train_dpo(
            reference["path"],
            dataset_path,
            run_dir,
            policy=policy["path"],
            **plan.training_options,
            config_overrides={**plan.config_overrides, "save_only_model": False},
            lora=copy.deepcopy(plan.lora),  # peft writes the policy's name into the config it is given
            resume_from_checkpoint=resume,
            callbacks=[resume_state_pruner()],
            progress=run.progress,
            log=log,
        )
        training = result.record
    if training["reference"]["fingerprint"] != reference["fingerprint"]:
        raise DataError(f"{run_dir}: trained against another reference than round {k}'s; use a new --workdir")
    checkpoints = sorted(find_checkpoints(run_dir))
    last_folder = run_dir / f"checkpoint-{checkpoints[-1]}"
    prune_resume_state(run_dir, newest=checkpoints[-1] + 1)  # the round is over: no checkpoint needs it any more

    method = plan.average_method
    average_dir = plan.workdir / f"round-{k}-{method.name}"
    if plan.lora is None:
        log(f"round {k}/{rounds}: averaging {run_dir} ({method.describe()}; step 0 is {policy['path']}) -> {average_dir}")
    else:  # TRL's op-by-op replay needs full weights: a LoRA run's average is W0 + s·Σ wᵢ·Bᵢ·Aᵢ, by effective weights
        log(
            f"round {k}/{rounds}: averaging the adapters of {run_dir} ({method.label()}, by its effective weights), "
            f"merged onto {policy['path']} -> {average_dir}"
        )
    averaged = average(
        run_dir,
        average_dir,
        schedule=method,
        base_model=policy["path"],  # of a LoRA round: the model its adapters are on, the base of the merge
        lora_output="merged",
        overwrite=True,  # an average published by a run killed before it recorded the round is made again
        resume=True,  # an average killed while writing reuses its finished shards
        progress=run.progress,
    )
    for note in averaged.plan.notes:
        log(f"note: {note}")
    output = averaged.outputs[0]
    run.fingerprints.pop(str(average_dir), None)
    entry = {
        "round": k,
        "dataset": dataset,
        "reference": reference,
        "policy": policy,
        "training": {
            "output_dir": str(run_dir),
            "global_step": training["global_step"],
            "checkpoints": checkpoints,
            "resumed_from": training.get("resumed_from"),
            "last_checkpoint": {"path": str(last_folder), "fingerprint": run.fingerprint(last_folder)},
            "dpo": training["dpo"],
        },
        "average": {
            "path": str(average_dir),
            "fingerprint": run.fingerprint(average_dir),
            "method": method.to_dict(),
            "label": method.label(),
            "kind": output.kind,
            "step": output.step,
            "theta0": policy["path"],
            "update_steps": averaged.plan.schedules[0].update_steps if averaged.plan.schedules else None,
            "ignored_steps": averaged.plan.ignored_steps,
            "effective_weights": {str(step): weight for step, weight in sorted(output.weights.items())},
        },
        "finished": _now(),
    }
    if _merges_last_checkpoint(plan):
        _merge_last_checkpoint(run, entry)
    run.record["rounds"].append(entry)
    run.record["in_progress"] = None
    run.save()
    log(f"round {k}/{rounds}: finished; recorded in {plan.workdir / ROUNDS_FILE}")


def _merges_last_checkpoint(plan: IteratePlan) -> bool:
    """Whether a LoRA round's last checkpoint is needed as a model folder: by the next round (its reference or policy),
    or by the evaluation."""
    uses_last = plan.reference == "last" or plan.policy_start == "last" or plan.eval_data is not None
    return plan.lora is not None and uses_last


def _merge_last_checkpoint(run: _Run, entry: dict) -> None:
    """Merge a LoRA round's last adapter checkpoint onto the round's policy, into `round-K-last/`, and record it as
    the entry's `training.last_merged`.

    The merge is `bema-average`'s, with all the weight on that checkpoint (`Uniform(last=1)`): W0 + s·B·A streamed
    within the memory budget, published atomically, and computed as the round's average computes its merge.
    """
    plan, k = run.plan, entry["round"]
    training = entry["training"]
    folder = plan.workdir / f"round-{k}-last"
    run.log(f"round {k}/{plan.rounds}: merging the last checkpoint {training['last_checkpoint']['path']} onto {entry['policy']['path']} -> {folder}")
    average(
        training["output_dir"],
        folder,
        schedule=Uniform(last=1),
        base_model=entry["policy"]["path"],
        lora_output="merged",
        overwrite=True,
        resume=True,
        progress=run.progress,
    )
    run.fingerprints.pop(str(folder), None)
    training["last_merged"] = {"path": str(folder), "fingerprint": run.fingerprint(folder)}


def _read_training_record(run_dir: Path) -> dict | None:
    """The record `train_dpo` writes when a round's training is over (atomically), or None."""
    try:
        record = json.loads((run_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "global_step" in record else None


# --- evaluation and Hub -----------------------------------------------------------------------------------------


def _evaluate_round(run: _Run, entry: dict) -> None:
    """Evaluate round k's reference, last checkpoint and average on the eval data, unless rounds.json holds their
    scores on the same data with the same settings already."""
    earlier = run.record["rounds"][: entry["round"] - 1]
    if evaluate_round(run.plan, run.record["plan"], entry, earlier, log=run.log, rounds=run.plan.rounds):
        run.save()


def _push_round(run: _Run, entry: dict) -> None:
    plan = run.plan
    k = entry["round"]
    branch = f"round-{k}"
    if entry.get("push", {}).get("repo") == plan.push_to_hub and entry["push"].get("fingerprint") == entry["average"]["fingerprint"]:
        return
    run.log(f"round {k}/{plan.rounds}: pushing {entry['average']['path']} to {plan.push_to_hub}@{branch}")
    hub.push_to_hub(
        entry["average"]["path"],
        plan.push_to_hub,
        private=plan.private,
        revision=branch,
        layout="branches",
        token=run.push_token,
        api=run.hub_api,
        commit_message=f"bema-offline iterate: round {k}'s {average_title(entry)}",
        log=run.log,
    )
    pushed = {"repo": plan.push_to_hub, "revision": branch, "fingerprint": entry["average"]["fingerprint"]}
    card = rounds_card({**run.record, "rounds": run.record["rounds"][:k]}, plan.workdir, repo_id=plan.push_to_hub)
    try:
        run.hub_api.upload_file(
            path_or_fileobj=card.encode(),
            path_in_repo="README.md",
            repo_id=plan.push_to_hub,
            repo_type="model",
            commit_message=f"bema-offline iterate: rounds table after round {k}",
        )
    except Exception as e:  # huggingface_hub raises HTTP, network and validation errors alike
        raise hub.HubError(
            f"writing the rounds table to the main branch of {plan.push_to_hub} failed ({first_line(e)}); "
            f"round {k} is on branch {branch}; run the same command again to retry"
        ) from e
    entry["push"] = pushed  # recorded once the card is up too, so that a rerun retries both
    run.save()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
