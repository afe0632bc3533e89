"""The plan of a run: which checkpoints are read, which outputs are written, and each output's effective weights.

A run is a list of named configs, each an averaging method (`bema_offline.methods`). TRL's `bema` and `ema` are
replayed by the engine op for op (a `ScheduleRun` each, with the outputs `--save`, `--every-update` and `--steps`
ask for); every other method is one output, the weighted sum of its sources. Making a plan reads headers only, and
checks that every source agrees on tensor names, shapes and dtypes, so that a run fails before it reads a tensor.

A LoRA run (`checkpoint-N/` folders holding PEFT adapters) is planned the same way: every method gives each source
its effective weight, and `Plan.lora` holds the adapters, mapped onto the base model, and how to write the average
(`--lora-output`, `--lora-rank`, `--lora-average`). Its outputs, replayed configs included, are the weighted sums
W0 + s·Σ wᵢ·Bᵢ·Aᵢ (`engine/lora_engine.py`): TRL's op-by-op replay needs every checkpoint's full weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import DTYPES, FLOAT_DTYPES
from ..errors import BemaError, DataError, UsageError, steps_text
from ..files import FileIdentity, file_identity, read_json_file
from ..methods.base import Method
from ..methods.replay import BEMA, EMA
from ..methods.schedule import KINDS, BEMASchedule, checked_update_steps, effective_weights
from ..sources.peft import ADAPTER_CONFIG, AdapterRun, check_init, check_one_kind, load_adapter_run, read_adapter_config
from ..sources.run import BASE_STEP, WeightSource, find_checkpoints, load_source, read_trainer_state, sidecar_origins
from ..sources.tensors import TensorInfo

LORA_OUTPUTS = ("merged", "adapter")
LORA_AVERAGES = ("exact", "factors")


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


@dataclass(frozen=True)
class LoraPlan:
    """How a LoRA run is averaged.

    Args:
        run (`AdapterRun`): the adapter checkpoints read, checked to agree, and their layout on the base model.
        base (`WeightSource`): the base model: W0 of every checkpoint's weights θᵢ = W0 + s·Bᵢ·Aᵢ.
        output (`str`, defaults to "merged"): "merged" (a model folder) or "adapter" (a PEFT adapter folder).
        rank (`int`, *optional*): `--lora-rank`: truncate the adapter output to this rank.
        average (`str`, defaults to "exact"): "exact", or "factors" (A and B averaged separately).
    """

    run: AdapterRun
    base: WeightSource
    output: str = "merged"
    rank: int | None = None
    average: str = "exact"

    @property
    def steps(self) -> list[int]:
        """The checkpoints whose factors are read."""
        return sorted(self.run.checkpoints)

    @functools.cached_property
    def theta0_names(self) -> dict[str, str]:
        """Every tensor of a merged output, with the base tensor that holds its W0."""
        return self.run.layout.output_tensors(self.base)

    def read_bytes(self, name: str) -> int:
        """The input bytes that computing output tensor `name` of a merged output reads: its rows of W0, and from
        each checkpoint the factors (or the copy trained in full) that change it."""
        layout = self.run.layout
        theta0 = self.theta0_names[name]
        keys: tuple[str, ...] = ()
        if name in layout.modules:
            keys = layout.modules[name].factor_keys
        elif name in layout.lora_biases:
            keys = layout.lora_biases[name].factor_keys
        elif name in layout.full_tensors:
            keys = (layout.full_tensors[name].key,)
        return self.base.tensors[theta0].nbytes + sum(self._key_bytes(step, key) for step in self.steps for key in keys)

    def adapter_read_bytes(self) -> int:
        """The input bytes an adapter output reads: every checkpoint's factors and copies trained in full, and the
        base's θ0 of those copies."""
        layout = self.run.layout
        keys = [key for module in layout.modules.values() for key in module.factor_keys]
        keys += [tensor.key for tensor in layout.full_tensors.values()]
        base = sum(self.base.tensors[tensor.theta0].nbytes for tensor in layout.full_tensors.values())
        return base + sum(self._key_bytes(step, key) for step in self.steps for key in keys)

    def _key_bytes(self, step: int, key: str) -> int:
        dtype, shape = self.run.checkpoints[step].shapes[key]
        return math.prod(shape) * DTYPES[dtype].itemsize

    def describe(self) -> list[str]:
        """Lines for `--dry-run`: the base, the adapter's targets, ranks and scalings, and the output."""
        lines = [f"base model (W0): {self.base.folder}", *self.run.layout.describe()]
        if self.output == "adapter":
            rank = f", truncated to rank {self.rank} by SVD" if self.rank is not None else ", lossless (rank r × checkpoints)"
            lines.append(f"output: a PEFT adapter folder{rank if self.average == 'exact' else ''}")
        else:
            lines.append("output: the merged model (W0 + s·Σ wᵢ·Bᵢ·Aᵢ), a full model folder")
        if self.average == "factors":
            lines.append("averaging: A and B separately (--lora-average factors), not the average of the weights")
        return lines


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
    origin: str | None = None  # where the run really is, when `run_dir` stands for it (a Hub run: hf://ORG/NAME)
    lora: LoraPlan | None = None  # a LoRA run: its adapters and how to write their average

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
        if self.lora is not None:
            if self.lora.output == "adapter":
                return self.lora.adapter_read_bytes()
            return sum(self.lora.read_bytes(t.name) for t in self.tensors)
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
    lora_output: str = "merged",
    lora_rank: int | None = None,
    lora_average: str = "exact",
    load: Callable[[Path, int], WeightSource] | None = None,
    on_needed: Callable[[list[int]], None] | None = None,
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
        dtype: output dtype for floating-point tensors ("float32", "bfloat16", "float16"); default: the inputs'
            (the base model's for a LoRA run).
        lora_output, lora_rank, lora_average: for a LoRA run, "merged" or "adapter", the adapter output's rank,
            and "exact" or "factors" (see `LoraPlan`).
        load: reads a checkpoint's headers (folder, step); default `load_source` (a Hub run reads them as it
            downloads, or over range requests).
        on_needed: told the checkpoints that will be read, in order, before the first is (a Hub run downloads them
            one ahead).
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
    adapters = check_one_kind(found)
    _check_lora_options(adapters, run_dir, lora_output, lora_rank, lora_average)
    base_named_by = None  # the adapter config that names the base model, when no base model was given
    if adapters and base_model_dir is None and base_model is None:
        base_named_by, base_model = _adapter_base_model(found)
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
    _check_weights_fit(outputs)
    needed = sorted({run.schedule.theta0_step for run in runs} | {step for out in outputs for step in out.weights})
    if adapters:  # W0 is in every checkpoint's weights
        needed = sorted({BASE_STEP, *needed})
    if on_needed is not None:
        on_needed([step for step in needed if step != BASE_STEP])
    sources: dict[int, WeightSource] = {}
    for step in needed:
        if step == BASE_STEP:
            if base_model_dir is None:
                base_model_dir = _resolve_base(base_model, resolve_base, named_by=base_named_by)
            sources[step] = load_source(Path(base_model_dir), BASE_STEP)
        elif not adapters:
            sources[step] = _load_checkpoint(found, step, load or load_source)
    if adapters:
        return _lora_plan(
            run_dir, found, sources[BASE_STEP], runs, outputs, base_model=base_model, base_model_dir=base_model_dir,
            dtype=dtype, output=lora_output, rank=lora_rank, average=lora_average, base_given=base_named_by is None,
        )
    notes = [*_source_notes(sources), *untie_head(sources, sources[needed[-1]])]
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


def _check_lora_options(adapters: bool, run_dir: str | Path, output: str, rank: int | None, average: str) -> None:
    if output not in LORA_OUTPUTS:
        raise UsageError(f"--lora-output must be one of {', '.join(LORA_OUTPUTS)}, got {output!r}")
    if average not in LORA_AVERAGES:
        raise UsageError(f"--lora-average must be one of {', '.join(LORA_AVERAGES)}, got {average!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--lora-rank must be a positive integer, got {rank!r}")
    given = [option for option, value in (("--lora-output", output != "merged"), ("--lora-rank", rank is not None), ("--lora-average", average != "exact")) if value]
    if given and not adapters:
        raise UsageError(f"{', '.join(given)}: {run_dir} holds full model checkpoints, not LoRA adapters; leave out the --lora-* options")
    if rank is not None and output != "adapter":
        raise UsageError("--lora-rank truncates an adapter output; add --lora-output adapter (a merged model has no rank)")
    if rank is not None and average == "factors":
        raise UsageError("--lora-rank truncates the exact average; it does not combine with --lora-average factors")


def _adapter_base_model(found: dict[int, Path]) -> tuple[Path, str]:
    """The newest adapter config's path, and the base model it names (`base_model_name_or_path`)."""
    config = read_adapter_config(found[max(found)] / ADAPTER_CONFIG)
    if config.base_model_name_or_path is None:
        raise DataError(f"{config.path}: names no base model (base_model_name_or_path); pass the model the adapter was trained on with --base-model")
    return config.path, config.base_model_name_or_path


def _resolve_base(base_model: str, resolve_base: Callable[[str], Path] | None, *, named_by: Path | None) -> Path:
    """The base model's local folder; a base that an adapter config names and that cannot be found is bad data."""
    if resolve_base is None:
        return Path(base_model)
    try:
        return resolve_base(base_model)
    except BemaError as e:
        if named_by is None:
            raise
        reason = str(e).removeprefix(f"--base-model {base_model}: ")
        raise DataError(
            f"{named_by}: cannot find the base model {base_model!r} that base_model_name_or_path names ({reason}); "
            "pass the model the adapter was trained on with --base-model"
        ) from e


def _lora_plan(
    run_dir: str | Path,
    found: dict[int, Path],
    base: WeightSource,
    runs: list[ScheduleRun],
    outputs: list[OutputSpec],
    *,
    base_model: str | None,
    base_model_dir: Path,
    dtype: str | None,
    output: str,
    rank: int | None,
    average: str,
    base_given: bool,
) -> Plan:
    """The plan of a LoRA run: the checkpoints that any output weighs (the newest when none does), mapped onto the
    base model; the output tensors are the base's (and a head untied from its embedding)."""
    steps = sorted({step for out in outputs for step in out.weights if step != BASE_STEP}) or [max(found)]
    config_path = Path(base_model_dir) / "config.json"
    base_config = read_json_file(config_path, what="model config", hint="fix it or pass another --base-model") if config_path.is_file() else None
    run = load_adapter_run({step: found[step] for step in steps}, base, base_config=base_config if isinstance(base_config, dict) else None)
    layout = run.layout
    notes = []
    note = check_init(layout.config, base_is_theta0=any(BASE_STEP in out.weights for out in outputs))
    if note:
        notes.append(note)
    named = layout.config.base_model_name_or_path
    if base_given and named is not None and not _same_model(named, base_model if base_model is not None else base_model_dir):
        notes.append(f"the adapters name {named!r} as their base model (base_model_name_or_path); W0 is the base model given, {base.folder}")
    if layout.config.use_dora and (output == "adapter" or average == "factors"):
        option = "--lora-output adapter" if output == "adapter" else "--lora-average factors"
        raise UsageError(
            f"{option}: {layout.config.path} is a DoRA adapter (use_dora), whose merged weight is not linear in its factors, "
            "so no adapter holds the average; use the default --lora-output merged --lora-average exact"
        )
    sources: dict[int, WeightSource] = {BASE_STEP: base}
    for step, checkpoint in run.checkpoints.items():
        checkpoint.identities[checkpoint.config.path] = file_identity(checkpoint.config.path)  # its bytes shape the output
        sources[step] = checkpoint.source or WeightSource(step, checkpoint.folder, {}, checkpoint.identities, layout="peft adapter (.bin)")
    tensors = [
        base.tensors[theta0] if name == theta0 else dataclasses.replace(base.tensors[theta0], name=name)
        for name, theta0 in layout.output_tensors(base).items()
    ]
    output_dtypes = {info.name: (FLOAT_DTYPES[dtype] if dtype and info.is_float else info.dtype) for info in tensors}
    adapter_dtypes = {run.checkpoints[steps[-1]].shapes[module.lora_B][0] for module in layout.modules.values()}
    base_dtypes = {base.tensors[module.theta0].dtype for module in layout.modules.values()}
    if output == "merged" and dtype is None and any(DTYPES[a].itemsize > DTYPES[b].itemsize for a in adapter_dtypes for b in base_dtypes):
        notes.append(
            f"the merged weights are written in the base model's dtype ({', '.join(sorted(base_dtypes))}) while the adapters "
            f"are {', '.join(sorted(adapter_dtypes))}; --dtype float32 keeps the small changes of a short run"
        )
    newest = found[max(found)]
    return Plan(
        run_dir=Path(run_dir),
        found_steps=sorted(found),
        schedules=runs,
        outputs=outputs,
        sources=sources,
        tensors=tensors,
        output_dtypes=output_dtypes,
        base_model=base_model if base_model is not None else str(base_model_dir),
        trainer_state=read_trainer_state(newest),
        notes=notes,
        sidecars={step: _sidecars(sources, step, Path(run_dir), base.folder) for step in sorted({out.step for out in outputs})},
        lora=LoraPlan(run, base, output=output, rank=rank, average=average),
    )


def _same_model(named: str, given: str | Path) -> bool:
    """Whether two names of a model are the same: equal, or the same local folder."""
    if str(named) == str(given):
        return True
    try:
        return Path(named).expanduser().resolve() == Path(given).expanduser().resolve() and Path(named).expanduser().is_dir()
    except OSError:
        return False


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


def untie_head(sources: dict[int, WeightSource], reference: WeightSource) -> list[str]:
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


def _load_checkpoint(found: dict[int, Path], step: int, load: Callable[[Path, int], WeightSource]) -> WeightSource:
    """`load` (`load_source`), with a hint when the newest checkpoint is the broken one (a run killed while saving)."""
    try:
        return load(found[step], step)
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


FLOAT32_MAX = 3.4028234663852886e38


def _check_weights_fit(outputs: list[OutputSpec]) -> None:
    """Every effective weight is a finite float32 (the engine rounds the float64 weights to float32 once)."""
    for output in outputs:
        step, weight = next(((s, w) for s, w in output.weights.items() if not abs(w) <= FLOAT32_MAX), (None, None))
        if step is not None:
            where = f"config {output.config}: " if output.config else ""
            raise UsageError(
                f"{where}{output.kind} gives {'the base' if step == BASE_STEP else f'step {step}'} the weight {weight:g}, "
                "beyond float32; choose smaller parameters (e.g. a smaller --alpha)"
            )


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
