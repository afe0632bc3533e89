"""The plan of a run: which checkpoints are read, which outputs are written, and each output's effective weights.

Making a plan reads safetensors headers only, and checks that every source agrees on tensor names, shapes and
dtypes, so that a run fails before it reads a single tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import FLOAT_DTYPES
from ..errors import DataError, UsageError
from ..files import FileIdentity
from ..methods.schedule import KINDS, BEMASchedule, effective_weights
from ..sources.run import BASE_STEP, WeightSource, _steps_text, find_checkpoints, load_source, read_trainer_state, sidecar_origins
from ..sources.tensors import TensorInfo


@dataclass(frozen=True)
class ScheduleRun:
    """One schedule of the run and the steps it replays."""

    name: str  # "" when the run has a single schedule
    schedule: BEMASchedule
    update_steps: list[int]  # present update steps, in order
    missing_steps: list[int]  # the first update steps with no checkpoint (skipped with allow_missing)
    missing_count: int = 0  # how many update steps have no checkpoint


@dataclass(frozen=True)
class OutputSpec:
    """One output model folder."""

    schedule_index: int
    kind: str
    step: int
    relpath: str  # relative to the run's output folder; "" is the folder itself
    weights: dict[int, float]  # source step -> effective weight (0 is the base model)


@dataclass
class Plan:
    run_dir: Path
    found_steps: list[int]
    schedules: list[ScheduleRun]
    outputs: list[OutputSpec]
    sources: dict[int, WeightSource]  # every source read, by step
    tensors: list[TensorInfo]  # the reference layout: the newest source read
    output_dtypes: dict[str, str]  # safetensors dtype name of each output tensor
    base_model: str | None = None
    trainer_state: dict | None = None
    notes: list[str] = field(default_factory=list)
    sidecars: dict[int, dict[str, Path]] = field(default_factory=dict)  # output step -> sidecar file -> where from

    @property
    def read_steps(self) -> list[int]:
        return sorted(self.sources)

    @property
    def ignored_steps(self) -> list[int]:
        return [s for s in self.found_steps if s not in self.sources]

    @property
    def identities(self) -> dict[Path, FileIdentity]:
        """Every input file, as it was when planned (the engine refuses a file that changed since)."""
        return {path: identity for source in self.sources.values() for path, identity in source.identities.items()}

    @property
    def bytes_to_read(self) -> int:
        return sum(source.tensors[t.name].nbytes for source in self.sources.values() for t in self.tensors)


def make_plan(
    run_dir: str | Path,
    schedules: Sequence[tuple[str, BEMASchedule]],
    *,
    base_model_dir: Path | None = None,
    base_model: str | None = None,
    save: Sequence[str] = ("bema",),
    steps: str | Sequence[int] = "last",
    min_step: int | None = None,
    max_step: int | None = None,
    allow_missing: bool = False,
    dtype: str | None = None,
) -> Plan:
    """Decide what a run reads and writes, and validate every input header.

    Args:
        run_dir: the Trainer's output_dir with `checkpoint-N` folders.
        schedules: (name, schedule) pairs; one pair with name "" for an ordinary run.
        base_model_dir: local folder of the weights before training, needed when a schedule has update_after 0.
        base_model: how the user named the base model (recorded in the card), defaults to `base_model_dir`.
        save: kinds of output, "bema" and/or "ema".
        steps: "last" (the last update step), "every" (every update step), or a list of update steps.
        min_step, max_step: narrow the checkpoints considered.
        allow_missing: skip update steps that have no checkpoint instead of failing.
        dtype: output dtype for floating-point tensors ("float32", "bfloat16", "float16"); default: the inputs'.
    """
    save = list(dict.fromkeys(save))
    if not save or any(kind not in KINDS for kind in save):
        raise UsageError(f"--save takes {' and/or '.join(KINDS)}, got {','.join(save) or 'nothing'}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    names = [name for name, _ in schedules]
    if len(names) > 1 and (not all(names) or len(set(names)) < len(names)):
        raise UsageError(f"several schedules need distinct names (one output folder each), got {names}")
    found = find_checkpoints(run_dir, min_step=min_step, max_step=max_step)
    runs = [_schedule_run(name, schedule, found, allow_missing) for name, schedule in schedules]

    outputs = _outputs(runs, save, steps)
    last_output = {index: max(out.step for out in outputs if out.schedule_index == index) for index in range(len(runs))}
    # a schedule's update steps after its last output change nothing that is written: they are not read
    needed = sorted(
        {run.schedule.theta0_step for run in runs}
        | {s for index, run in enumerate(runs) for s in run.update_steps if s <= last_output[index]}
    )
    sources: dict[int, WeightSource] = {}
    for step in needed:
        if step == BASE_STEP:
            if base_model_dir is None:
                raise UsageError(
                    "update_after is 0, so θ0 is the model before training: pass --base-model "
                    "(a local folder or a Hub repo id), or set --update-after to a saved step"
                )
            sources[step] = load_source(Path(base_model_dir), BASE_STEP)
        else:
            sources[step] = _load_checkpoint(found, step)
    reference = sources[needed[-1]]
    notes = _check_sources(reference, sources)
    output_dtypes = {
        name: (FLOAT_DTYPES[dtype] if dtype and info.is_float else info.dtype)
        for name, info in reference.tensors.items()
    }
    newest = found[max(found)]
    return Plan(
        run_dir=Path(run_dir),
        found_steps=sorted(found),
        schedules=runs,
        outputs=outputs,
        sources=sources,
        tensors=list(reference.tensors.values()),
        output_dtypes=output_dtypes,
        base_model=base_model if base_model is not None else (str(base_model_dir) if base_model_dir else None),
        trainer_state=read_trainer_state(newest),
        notes=notes,
        sidecars={step: _sidecars(sources, step, Path(run_dir)) for step in sorted({out.step for out in outputs})},
    )


def _sidecars(sources: dict[int, WeightSource], step: int, run_dir: Path) -> dict[str, Path]:
    """An output's config and tokenizer files: from the newest source at or before its step, then older ones, the
    base model (a sharded FSDP checkpoint has none) and the run folder."""
    newest_first = [sources[s].folder for s in sorted(sources, reverse=True) if s <= step]
    return sidecar_origins(newest_first + [run_dir])


def _load_checkpoint(found: dict[int, Path], step: int) -> WeightSource:
    """`load_source`, with a hint when the newest checkpoint is the broken one (a run killed while saving it)."""
    try:
        return load_source(found[step], step)
    except DataError as e:
        older = [s for s in found if s < step]
        if step != max(found) or not older:
            raise
        raise DataError(f"{e}; if the run was killed while saving checkpoint-{step}, leave it out with --max-step {max(older)}") from e


def _schedule_run(name: str, schedule: BEMASchedule, found: dict[int, Path], allow_missing: bool) -> ScheduleRun:
    """The update steps a schedule replays, computed from the checkpoints found (never by walking every step: a stray
    `checkpoint-1000000000000` costs nothing), with the fitting hint when some have no checkpoint."""
    where = f" (config {name})" if name else ""
    tau = schedule.theta0_step
    if tau != BASE_STEP and tau not in found:
        raise DataError(
            f"update_after is {tau}{where}, so θ0 is checkpoint-{tau}, which is not among the checkpoints "
            f"(steps {_steps_text(found)}); choose --update-after from those steps"
        )
    present = [step for step in found if schedule.is_update_step(step)]
    schedule.check_steps(present)
    missing, missing_count = _missing_update_steps(schedule, present, max(found))
    if missing_count and not allow_missing:
        raise DataError(
            f"update steps {_steps_text(missing, total=missing_count)} have no checkpoint{where}, so an exact replay is "
            f"impossible; {_missing_hint(schedule, found, present, missing)}"
        )
    if not present:
        raise DataError(
            f"no checkpoint falls on an update step{where} (update_after {tau}, update_freq "
            f"{schedule.update_freq}; found steps {_steps_text(found)})"
        )
    return ScheduleRun(name, schedule, present, missing, missing_count)


MISSING_LISTED = 100  # missing update steps listed in the provenance (all are counted)


def _missing_update_steps(schedule: BEMASchedule, present: list[int], last: int) -> tuple[list[int], int]:
    """The first `MISSING_LISTED` update steps up to `last` that have no checkpoint, and how many there are."""
    if schedule.convention == "paper":  # every checkpoint is an update step: none can be missing
        return [], 0
    tau, phi = schedule.update_after, schedule.update_freq
    total = max(0, (last - tau) // phi)
    have = set(present)
    listed, step = [], tau + phi
    while len(listed) < MISSING_LISTED and len(listed) < total - len(present) and step <= last:
        if step not in have:
            listed.append(step)
        step += phi
    return listed, total - len(present)


def _missing_hint(schedule: BEMASchedule, found: dict[int, Path], present: list[int], missing: list[int]) -> str:
    """What fixes a replay with missing update steps, without repeating what the user already passed."""
    hints = []
    exact_from = _exact_start(schedule, found) if schedule.convention == "trl" else None
    if exact_from is not None and exact_from != schedule.update_after:
        older = " (the older checkpoints were deleted, e.g. by save_total_limit)" if exact_from == min(found) else ""
        hints.append(f"replay exactly from checkpoint-{exact_from} with --update-after {exact_from}{older}")
    cadence = _save_cadence(found)
    if cadence and cadence != schedule.update_freq and exact_from is None:
        hints.append(f"checkpoints are {cadence} steps apart, so try --update-freq {cadence}")
    steps = sorted(found)
    if len(steps) > 1 and missing and missing[0] > steps[-2]:
        hints.append(f"leave out the far checkpoint-{steps[-1]} with --max-step {steps[-2]}")
    allow = "pass --allow-missing to skip them"
    if present:
        theta0_weight = effective_weights(schedule, present, [present[-1]])[present[-1]][schedule.theta0_step]
        allow += f" (θ0 would then weigh {theta0_weight:.3f} in the output)"
    return "; ".join(hints + [("or " if hints else "") + allow])


def _exact_start(schedule: BEMASchedule, found: dict[int, Path]) -> int | None:
    """The oldest of the first few checkpoints from which, as θ0, the schedule's update steps all have a checkpoint."""
    last = max(found)
    for start in sorted(found)[:5]:
        later = sum(1 for step in found if step > start and (step - start) % schedule.update_freq == 0)
        if later and later == (last - start) // schedule.update_freq:
            return start
    return None


def _save_cadence(found: dict[int, Path]) -> int | None:
    steps = sorted(found)
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    return gaps.pop() if len(gaps) == 1 else None


def _check_sources(reference: WeightSource, sources: dict[int, WeightSource]) -> list[str]:
    """Every source has the reference's tensors with the same shapes; checkpoints also the same dtypes."""
    notes = []
    for step, source in sources.items():
        missing = [n for n in reference.tensors if n not in source.tensors]
        if missing:
            raise DataError(
                f"tensor {missing[0]!r} is in step {reference.step} but missing from {source.label}"
                + (f" ({len(missing)} tensors missing)" if len(missing) > 1 else "")
            )
        extra = [n for n in source.tensors if n not in reference.tensors]
        if extra and step != BASE_STEP:
            raise DataError(f"tensor {extra[0]!r} is in {source.label} but not in step {reference.step}; the checkpoints disagree")
        if extra:
            notes.append(f"the base model has {len(extra)} tensors the checkpoints lack, ignored: {', '.join(extra[:5])}")
        for name, ref in reference.tensors.items():
            info = source.tensors[name]
            if info.shape != ref.shape:
                hint = "; set --update-after to a saved step so that θ0 is a checkpoint" if step == BASE_STEP else ""
                raise DataError(
                    f"tensor {name!r} has shape {list(info.shape)} in {source.label} but {list(ref.shape)} "
                    f"in step {reference.step}; a resized model cannot be averaged{hint}"
                )
            if info.dtype != ref.dtype:
                if step == BASE_STEP and info.is_float and ref.is_float:
                    notes.append(f"base model tensor {name!r} is {info.dtype}, the checkpoints' is {ref.dtype}")
                    continue
                raise DataError(
                    f"tensor {name!r} is {info.dtype} in {source.label} but {ref.dtype} in step {reference.step}; "
                    "dtypes must agree across steps"
                )
    return notes


def _outputs(runs: list[ScheduleRun], save: list[str], steps: str | Sequence[int]) -> list[OutputSpec]:
    outputs = []
    for index, run in enumerate(runs):
        if steps == "last":
            chosen = [run.update_steps[-1]]
        elif steps == "every":
            chosen = list(run.update_steps)
        else:
            chosen = sorted(set(steps))
            bad = [s for s in chosen if s not in run.update_steps]
            if bad:
                raise UsageError(
                    f"--steps {_steps_text(bad)}: not update steps with a checkpoint; "
                    f"choose from {_steps_text(run.update_steps)}"
                )
        for kind in save:
            weights = effective_weights(run.schedule, run.update_steps, chosen, kind)
            for step in chosen:
                parts = [run.name] if run.name else []
                parts += [kind] if len(save) > 1 else []
                parts += [f"step-{step}"] if steps != "last" else []
                outputs.append(OutputSpec(index, kind, step, "/".join(parts), weights[step]))
    return outputs
