"""The plan of a run: which checkpoints are read, which outputs are written, and each output's effective weights.

A run is a list of named configs, each an averaging method (`bema_offline.methods`). TRL's `bema` and `ema` are
replayed by the engine op for op (a `ScheduleRun` each, with the outputs `--save`, `--every-update` and `--steps`
ask for); every other method is one output, the weighted sum of its sources. Making a plan reads headers only, and
checks that every source agrees on tensor names, shapes and dtypes, so that a run fails before it reads a tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import FLOAT_DTYPES
from ..errors import DataError, UsageError, steps_text
from ..files import FileIdentity, read_json_file
from ..methods.base import Method
from ..methods.replay import BEMA, EMA
from ..methods.schedule import KINDS, BEMASchedule, checked_update_steps, effective_weights
from ..sources.run import BASE_STEP, WeightSource, find_checkpoints, load_source, read_trainer_state, sidecar_origins
from ..sources.tensors import TensorInfo


@dataclass(frozen=True)
class ScheduleRun:
    """One replayed config (TRL's `bema` or `ema`) and the steps it replays."""

    name: str  # "" when the run has a single config
    schedule: BEMASchedule
    update_steps: list[int]  # present update steps, in order
    missing_steps: list[int]  # the first update steps with no checkpoint (skipped with allow_missing)
    missing_count: int = 0  # how many update steps have no checkpoint


@dataclass(frozen=True)
class OutputSpec:
    """One output model folder.

    `schedule_index` names the `ScheduleRun` a replayed output comes from (`kind` "bema" or "ema"); a weighted
    output has none (`kind` is its method's name) and is the sum of `weights`.
    """

    schedule_index: int | None
    kind: str
    step: int
    relpath: str  # relative to the run's output folder; "" is the folder itself
    weights: dict[int, float]  # source step -> effective weight (0 is the base model)
    config: str = ""  # the config's name ("" for a single config)
    method: Method | None = None  # what the output averages (None only in plans made by hand)

    @property
    def replayed(self) -> bool:
        return self.schedule_index is not None


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
    def weighted_outputs(self) -> list[int]:
        """The indexes of the outputs that are weighted sums (not replays)."""
        return [index for index, out in enumerate(self.outputs) if not out.replayed]

    @property
    def identities(self) -> dict[Path, FileIdentity]:
        """Every input file, as it was when planned (the engine refuses a file that changed since)."""
        return {path: identity for source in self.sources.values() for path, identity in source.identities.items()}

    @property
    def bytes_to_read(self) -> int:
        return sum(source.tensors[t.name].nbytes for source in self.sources.values() for t in self.tensors)


Config = tuple[str, "Method | BEMASchedule"]


def make_plan(
    run_dir: str | Path,
    configs: Sequence[Config],
    *,
    base_model_dir: Path | None = None,
    base_model: str | None = None,
    resolve_base: Callable[[str], Path] | None = None,
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
        configs: (name, method) pairs; one pair with name "" for an ordinary run. A `BEMASchedule` stands for
            `BEMA(schedule)`.
        base_model_dir: local folder of the weights before training.
        base_model: how the user named the base model (recorded in the card); with `resolve_base`, it is turned
            into a local folder only if a config needs the base model (a Hub download is not made for nothing).
        resolve_base: turns `base_model` into a local folder.
        save: for the replayed `bema` configs, the kinds of output, "bema" and/or "ema".
        steps: for the replayed configs: "last" (the last update step), "every" (every update step), or a list.
        min_step, max_step: narrow the checkpoints considered.
        allow_missing: skip update steps that have no checkpoint instead of failing.
        dtype: output dtype for floating-point tensors ("float32", "bfloat16", "float16"); default: the inputs'.
    """
    save = list(dict.fromkeys(save))
    if not save or any(kind not in KINDS for kind in save):
        raise UsageError(f"--save takes {' and/or '.join(KINDS)}, got {','.join(save) or 'nothing'}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    configs = [(name, BEMA(method) if isinstance(method, BEMASchedule) else method) for name, method in configs]
    names = [name for name, _ in configs]
    if len(names) > 1 and (not all(names) or len(set(names)) < len(names)):
        raise UsageError(f"several configs need distinct names (one output folder each), got {names}")
    weighted = [name or method.label() for name, method in configs if not method.replayed]
    if weighted and steps != "last":
        raise UsageError(f"--every-update and --steps apply to bema and ema only, not to {', '.join(weighted)}")
    found = find_checkpoints(run_dir, min_step=min_step, max_step=max_step)
    has_base = base_model_dir is not None or base_model is not None
    runs: list[ScheduleRun] = []
    outputs: list[OutputSpec] = []
    for name, method in configs:
        if method.replayed:
            runs.append(_schedule_run(name, method.schedule, list(found), has_base, allow_missing))
            kinds = ["ema"] if isinstance(method, EMA) else save
            outputs += _replayed_outputs(len(runs) - 1, runs[-1], kinds, steps)
        else:
            weights = method.weights(list(found), base=has_base, allow_missing=allow_missing)
            outputs.append(OutputSpec(None, method.name, max(weights), name, weights, name, method))
    needed = sorted({run.schedule.theta0_step for run in runs} | {step for out in outputs for step in out.weights})
    sources: dict[int, WeightSource] = {}
    for step in needed:
        if step == BASE_STEP:
            if base_model_dir is None:
                base_model_dir = resolve_base(base_model) if resolve_base is not None else Path(base_model)
            sources[step] = load_source(Path(base_model_dir), BASE_STEP)
        else:
            sources[step] = _load_checkpoint(found, step)
    notes = [*_source_notes(sources), *_untie_head(sources, sources[needed[-1]])]
    reference = sources[needed[-1]]
    notes += _check_sources(reference, sources)
    output_dtypes = {
        name: (FLOAT_DTYPES[dtype] if dtype and info.is_float else info.dtype)
        for name, info in reference.tensors.items()
    }
    newest = found[max(found)]
    base_folder = base_model_dir if base_model_dir is not None else _local_folder(base_model)
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
        sidecars={step: _sidecars(sources, step, Path(run_dir), base_folder) for step in sorted({out.step for out in outputs})},
    )


def _sidecars(sources: dict[int, WeightSource], step: int, run_dir: Path, base_folder: Path | None) -> dict[str, Path]:
    """An output's config and tokenizer files: from the newest source at or before its step, then older ones, the
    run folder, and the base model even when it is not averaged (a sharded FSDP checkpoint has none)."""
    newest_first = [sources[s].folder for s in sorted(sources, reverse=True) if s <= step]
    return sidecar_origins(newest_first + [run_dir] + ([Path(base_folder)] if base_folder is not None else []))


def _local_folder(name: str | None) -> Path | None:
    """The base model's folder when it is a local one (a Hub id is not fetched just for its config)."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _source_notes(sources: dict[int, WeightSource]) -> list[str]:
    """What the readers say about the weights (e.g. DeepSpeed's fp32 master weights), once per distinct note."""
    steps: dict[str, list[int]] = {}
    for step, source in sorted(sources.items()):
        for note in source.notes:
            steps.setdefault(note, []).append(step)
    return [note if len(where) == 1 else f"{note} (and {len(where) - 1} more sources alike)" for note, where in steps.items()]


TIED_HEAD = "lm_head.weight"


def _untie_head(sources: dict[int, WeightSource], reference: WeightSource) -> list[str]:
    """A tied output head saved by the checkpoints (FSDP and DeepSpeed save it a second time; `save_pretrained`
    leaves it out), while the base, whose config ties it, lacks it: it is left out of the plan, as transformers'
    loader ties it again. Changes `sources` in place."""
    base = sources.get(BASE_STEP)
    if base is None or TIED_HEAD in base.tensors or TIED_HEAD not in reference.tensors or not _ties_embeddings(base.folder):
        return []
    for step, source in sources.items():
        if TIED_HEAD in source.tensors:
            sources[step] = dataclasses.replace(source, tensors={n: t for n, t in source.tensors.items() if n != TIED_HEAD})
    return [f"{TIED_HEAD} is saved by the checkpoints but tied to the input embedding (the base's config says so): left out, as save_pretrained does"]


def _ties_embeddings(folder: Path) -> bool:
    try:
        config = read_json_file(folder / "config.json", what="config", hint="ignored")
    except DataError:
        return False
    return isinstance(config, dict) and config.get("tie_word_embeddings") is True


def _load_checkpoint(found: dict[int, Path], step: int) -> WeightSource:
    """`load_source`, with a hint when the newest checkpoint is the broken one (a run killed while saving it)."""
    try:
        return load_source(found[step], step)
    except DataError as e:
        older = [s for s in found if s < step]
        if step != max(found) or not older:
            raise
        raise DataError(f"{e}; if the run was killed while saving checkpoint-{step}, leave it out with --max-step {max(older)}") from e


def _schedule_run(name: str, schedule: BEMASchedule, found: list[int], has_base: bool, allow_missing: bool) -> ScheduleRun:
    """The update steps a replayed config reads (see `checked_update_steps` for the checks and hints)."""
    steps = checked_update_steps(schedule, found, base=has_base, allow_missing=allow_missing, where=f" (config {name})" if name else "")
    return ScheduleRun(name, schedule, steps.present, steps.missing, steps.missing_count)


def _check_sources(reference: WeightSource, sources: dict[int, WeightSource]) -> list[str]:
    """Every source has the reference's tensors with the same shapes; checkpoints also the same dtypes."""
    notes = []
    upcast: dict[tuple[str, str], list[str]] = {}  # (base dtype, checkpoints' dtype) -> tensors
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
                    upcast.setdefault((info.dtype, ref.dtype), []).append(name)
                    continue
                raise DataError(
                    f"tensor {name!r} is {info.dtype} in {source.label} but {ref.dtype} in step {reference.step}; "
                    "dtypes must agree across steps"
                )
    for (base_dtype, dtype), names in upcast.items():
        notes.append(
            f"{len(names)} base model tensors are {base_dtype} where the checkpoints' are {dtype} (e.g. {names[0]!r}); "
            "they are read as they are and converted"
        )
    return notes


def _replayed_outputs(index: int, run: ScheduleRun, kinds: list[str], steps: str | Sequence[int]) -> list[OutputSpec]:
    """A replayed config's outputs: each kind asked for, at the last update step, every one, or those listed."""
    if steps == "last":
        chosen = [run.update_steps[-1]]
    elif steps == "every":
        chosen = list(run.update_steps)
    else:
        chosen = sorted(set(steps))
        bad = [s for s in chosen if s not in run.update_steps]
        if bad:
            raise UsageError(
                f"--steps {steps_text(bad)}: not update steps with a checkpoint; choose from {steps_text(run.update_steps)}"
            )
    outputs = []
    for kind in kinds:
        weights = effective_weights(run.schedule, run.update_steps, chosen, kind)
        output_method = (EMA if kind == "ema" else BEMA)(run.schedule)
        for step in chosen:
            parts = [run.name] if run.name else []
            parts += [kind] if len(kinds) > 1 else []
            parts += [f"step-{step}"] if steps != "last" else []
            outputs.append(OutputSpec(index, kind, step, "/".join(parts), weights[step], run.name, output_method))
    return outputs
