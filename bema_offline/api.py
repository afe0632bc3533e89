"""`average`: the library entry point, which the `bema-average` command mirrors.

checkpoint discovery → plan → streaming engine → writer → atomic publish
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .card import PROVENANCE_FILE, provenance, write_card
from .checkpoints import BASE_STEP, resolve_base_model
from .engine import Engine
from .errors import DataError, UsageError
from .faults import fault_point
from .plan import Plan, make_plan
from .publish import OutputLock, check_output, discard, interrupts_deferred, publish, staging_path
from .resume import Staging, plan_fingerprint, prepare_staging
from .safetensors_io import OpenFiles
from .schedule import BEMASchedule
from .verify import check_folder, output_files
from .writer import FolderSink, ModelFolderWriter, TensorSpec, copy_sidecar_files, parse_size, shard_layout

DEFAULT_MAX_MEMORY = "512MiB"
DEFAULT_MAX_SHARD_SIZE = "5GB"
ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class AveragedModel:
    """One output model folder."""

    path: Path
    step: int
    kind: str
    config: str | None
    weights: dict[int, float]  # source step (0: base model) -> effective weight


@dataclass(frozen=True)
class AverageResult:
    plan: Plan
    outputs: list[AveragedModel]
    written: bool
    removed_leftovers: bool = False
    reused_shards: int = 0  # shards of an interrupted run reused by `resume`
    resume_note: str | None = None  # why `resume` could not reuse anything


def average(
    checkpoint_dir: str | Path,
    output: str | Path,
    *,
    schedule: BEMASchedule | Sequence[tuple[str, BEMASchedule]] = BEMASchedule(),
    base_model: str | Path | None = None,
    save: Sequence[str] = ("bema",),
    steps: str | Sequence[int] = "last",
    min_step: int | None = None,
    max_step: int | None = None,
    allow_missing: bool = False,
    accum_dtype: str = "float32",
    dtype: str | None = None,
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    resume: bool = False,
) -> AverageResult:
    """Average a Trainer run's checkpoints with BEMA or EMA, streaming, and write Hugging Face model folders.

    Args:
        checkpoint_dir (`str | Path`): the run's output_dir, holding `checkpoint-N/` folders.
        output (`str | Path`): the output folder. With several outputs, each gets a subfolder
            (`CONFIG/`, `KIND/`, `step-N/`, as needed).
        schedule (`BEMASchedule` or list of `(name, BEMASchedule)`, defaults to TRL's defaults): one schedule,
            or several named ones computed in the same pass.
        base_model (`str | Path`, *optional*): weights before training (θ0 when update_after is 0): a local
            folder or a Hub repo id.
        save (`Sequence[str]`, defaults to `("bema",)`): "bema" and/or "ema" (the plain EMA, no correction).
        steps (`str | Sequence[int]`, defaults to "last"): "last" update step, "every" update step, or a list.
        min_step, max_step (`int`, *optional*): narrow the checkpoints considered.
        allow_missing (`bool`, defaults to False): skip update steps without a checkpoint instead of failing.
        accum_dtype (`str`, defaults to "float32"): "float32" or "float64" accumulation.
        dtype (`str`, *optional*): output dtype of float tensors; defaults to the checkpoints'.
        max_memory (`int | str`, defaults to "512MiB"): working-memory budget for tensor data.
        max_shard_size (`int | str`, defaults to "5GB"): largest output shard.
        overwrite (`bool`, defaults to False): replace an existing output folder.
        dry_run (`bool`, defaults to False): plan and validate only; write nothing.
        progress (`bool`, defaults to False): show progress bars.
        resume (`bool`, defaults to False): reuse the shards that an interrupted run with the same plan finished
            (inputs, parameters and tool version, checked by a hash); otherwise its leftovers are removed.

    Returns:
        `AverageResult`: the plan and the output folders.

    Example:

    ```python
    >>> result = average("runs/sft", "runs/sft-bema", schedule=BEMASchedule(update_freq=500), base_model="gpt2")
    >>> result.outputs[0].path
    PosixPath('runs/sft-bema')
    ```
    """
    output = Path(output)
    if accum_dtype not in ACCUM_DTYPES:
        raise UsageError(f"--accum-dtype must be float32 or float64, got {accum_dtype!r}")
    budget = parse_size(max_memory, option="--max-memory")
    shard_size = parse_size(max_shard_size, option="--max-shard-size")
    schedules = [("", schedule)] if isinstance(schedule, BEMASchedule) else list(schedule)
    needs_base = any(s.theta0_step == BASE_STEP for _, s in schedules)
    base_dir = resolve_base_model(base_model) if (base_model is not None and needs_base) else None
    plan = make_plan(
        checkpoint_dir,
        schedules,
        base_model_dir=base_dir,
        base_model=str(base_model) if base_model is not None else None,
        save=save,
        steps=steps,
        min_step=min_step,
        max_step=max_step,
        allow_missing=allow_missing,
        dtype=dtype,
    )
    outputs = [
        AveragedModel(
            output / spec.relpath if spec.relpath else output,
            spec.step,
            spec.kind,
            plan.schedules[spec.schedule_index].name or None,
            spec.weights,
        )
        for spec in plan.outputs
    ]
    source_folders = [source.folder for source in plan.sources.values()]
    check_output(output, overwrite=overwrite, run_dir=plan.run_dir, source_folders=source_folders)
    if dry_run:
        return AverageResult(plan, outputs, written=False)

    settings = {"accum_dtype": accum_dtype, "dtype": dtype, "max_memory": budget, "max_shard_size": shard_size}
    with OutputLock(output) as lock:
        fault_point("lock")
        try:
            staging = prepare_staging(output, plan_fingerprint(plan, settings), resume=resume)
            fault_point("staging")
            reused = _write_outputs(plan, staging.path, settings, progress=progress, journal=staging)
            check_output(output, overwrite=overwrite, run_dir=plan.run_dir, source_folders=source_folders)
            staging.remove_resume_files()
            with interrupts_deferred():
                publish(staging.path, output, overwrite=overwrite)
                lock.release()
        except BaseException as e:
            discard(staging_path(output))
            if isinstance(e, OSError) and not e.filename:  # a failed write() or fsync(): name where it went
                raise DataError(f"--output {output}: cannot write ({e.strerror or e}); free some disk space or choose another --output") from e
            raise
    return AverageResult(
        plan, outputs, written=True, removed_leftovers=staging.removed_leftovers, reused_shards=reused, resume_note=staging.note
    )


def _write_outputs(plan: Plan, staging: Path, settings: dict, *, progress: bool, journal: Staging) -> int:
    """Write every output folder under `staging`; returns the number of shards reused from an interrupted run."""
    specs = [TensorSpec(info.name, plan.output_dtypes[info.name], info.shape) for info in plan.tensors]
    folders = [staging / spec.relpath if spec.relpath else staging for spec in plan.outputs]
    layout = shard_layout(specs, settings["max_shard_size"])
    keep = journal.reusable_shards([spec.relpath for spec in plan.outputs], layout)
    kept_tensors = {spec.name for shard in layout if shard.name in keep for spec in shard.tensors}
    todo = dataclasses.replace(plan, tensors=[info for info in plan.tensors if info.name not in kept_tensors])
    with OpenFiles(writable=True, max_open=256) as files:
        writers = [
            ModelFolderWriter(
                folder, specs, max_shard_size=settings["max_shard_size"], files=files, keep_shards=keep, on_shard_done=journal.record_done
            )
            for folder in folders
        ]
        with _progress_bars(todo, enabled=progress) as on_progress:
            Engine(
                todo,
                FolderSink(writers),
                accum_dtype=ACCUM_DTYPES[settings["accum_dtype"]],
                max_memory=settings["max_memory"],
                on_progress=on_progress,
            ).run()
    expected = {spec.name: (spec.dtype, spec.shape) for spec in specs}
    for writer, folder, spec in zip(writers, folders, plan.outputs):
        writer.finish()
        check_folder(folder, expected=expected)  # the light verify, before anything is published
        newest_first = [plan.sources[s].folder for s in sorted(plan.sources, reverse=True) if s <= spec.step]
        dtype = settings["dtype"]
        copy_sidecar_files(newest_first + [plan.run_dir], folder, dtype=dtype)
        record = provenance(plan, spec, settings=settings)
        record["output_files"] = output_files(folder)
        (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_card(folder, record)
        fault_point("sidecars")
    return len(keep)


class _progress_bars:
    """Two tqdm bars, bytes read and tensors finished, fed by the engine's progress callback."""

    def __init__(self, plan: Plan, *, enabled: bool) -> None:
        self.enabled = enabled
        self.plan = plan

    def __enter__(self):
        if not self.enabled:
            return None
        self.bytes_bar = tqdm(total=self.plan.bytes_to_read, unit="B", unit_scale=True, unit_divisor=1024, desc="read")
        self.tensor_bar = tqdm(total=len(self.plan.tensors), unit="tensor", desc="tensors")

        def on_progress(nbytes: int, ntensors: int) -> None:
            if nbytes:
                self.bytes_bar.update(nbytes)
            if ntensors:
                self.tensor_bar.update(ntensors)

        return on_progress

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bytes_bar.close()
            self.tensor_bar.close()
