"""`average`: the library entry point, which the `bema-average` command mirrors.

checkpoint discovery → plan → streaming engine → writer → atomic publish
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .dtypes import FLOAT_DTYPES
from .engine.distributed import Share, assign_shards, join, plan_digest
from .engine.engine import MIN_MEMORY, Engine, check_device
from .engine.plan import OutputSpec, Plan, make_plan
from .errors import DataError, UsageError
from .faults import fault_point
from .files import OpenFiles, check_unchanged, replace_file
from .methods.base import Method
from .methods.schedule import BEMASchedule
from .output.card import PROVENANCE_FILE, provenance, run_training, write_card
from .output.publish import OutputLock, check_output, discard, interrupts_deferred, output_of, publish, staging_path, state_path
from .output.resume import Staging, plan_fingerprint, prepare_staging
from .output.verify import check_folder, output_files
from .output.writer import (
    FolderSink,
    ModelFolderWriter,
    ShardFlusher,
    ShardLayout,
    TensorSpec,
    copy_sidecar_files,
    parse_size,
    shard_layout,
)
from .sources.hub import HubDownloads, is_hub_url, open_hub_run
from .sources.peft import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, is_adapter_folder, load_adapter_checkpoint
from .sources.run import resolve_base_model
from .sources.runinfo import is_hub_id

DEFAULT_MAX_MEMORY = "512MiB"
DEFAULT_MAX_SHARD_SIZE = "5GB"
ACCUM_DTYPES = ("float32", "float64")
MODEL_SIDECARS = ("config.json", "generation_config.json")  # a model's, not an adapter output's


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
    bytes_read: int | None = None  # input bytes read by this process (less than the plan's after a resume)


def average(
    checkpoint_dir: str | Path,
    output: str | Path,
    *,
    schedule: BEMASchedule | Method | Sequence[tuple[str, BEMASchedule | Method]] = BEMASchedule(),
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
    threads: int | None = None,
    device: str = "cpu",
    distributed: bool = False,
    lora_output: str = "merged",
    lora_rank: int | None = None,
    lora_average: str = "exact",
    revisions: str | None = None,
    keep_downloads: bool = True,
    hub_api: Any | None = None,
) -> AverageResult:
    """Average a Trainer run's checkpoints, streaming, and write Hugging Face model folders.

    Args:
        checkpoint_dir (`str | Path`): the run's output_dir, holding `checkpoint-N/` folders; or a run on the Hub,
            `hf://ORG/NAME[@REVISION]` (see `open_run`).
        output (`str | Path`): the output folder. With several outputs, each gets a subfolder
            (`CONFIG/`, `KIND/`, `step-N/`, as needed).
        schedule (`BEMASchedule`, `Method`, or a list of `(name, BEMASchedule | Method)`, defaults to TRL's
            defaults): what to average: TRL's BEMA on a schedule, any method of `bema_offline.methods` (e.g.
            `Uniform(last=4)`), or several named configs computed in the same pass (one subfolder each).
        base_model (`str | Path`, *optional*): weights before training (θ0 when update_after is 0): a local
            folder or a Hub repo id.
        save (`Sequence[str]`, defaults to `("bema",)`): for BEMA configs, "bema" and/or "ema" (the plain EMA).
        steps (`str | Sequence[int]`, defaults to "last"): for BEMA and EMA configs, the "last" update step,
            "every" update step, or a list.
        min_step, max_step (`int`, *optional*): narrow the checkpoints considered.
        allow_missing (`bool`, defaults to False): skip update steps without a checkpoint instead of failing.
        accum_dtype (`str`, defaults to "float32"): "float32" or "float64" accumulation.
        dtype (`str`, *optional*): output dtype of float tensors; defaults to the checkpoints'.
        max_memory (`int | str`, defaults to "512MiB"): upper bound on the working memory for tensor data (the
            engine takes at most 8 MiB per thread even when allowed more; see `engine.CACHE_BYTES`).
        max_shard_size (`int | str`, defaults to "5GB"): largest output shard.
        overwrite (`bool`, defaults to False): replace an existing output folder.
        dry_run (`bool`, defaults to False): plan and validate only; write nothing.
        progress (`bool`, defaults to False): show progress bars.
        resume (`bool`, defaults to False): reuse the shards that an interrupted run with the same plan finished
            (inputs, parameters and tool version, checked by a hash); otherwise its leftovers are removed.
        threads (`int`, *optional*): worker threads; default one per core. The result does not depend on it.
        device (`str`, defaults to "cpu"): where the arithmetic runs: "cpu", "cuda" or "cuda:N" (the reads and
            writes stay on the CPU). In a distributed run, "cuda" means each rank's local GPU.
        distributed (`bool`, defaults to False): join the torch.distributed run this process is one rank of
            (started by torchrun): each rank writes its own shards, rank 0 publishes. The output is byte-identical
            to a single-process run's. See `bema_offline.engine.distributed`.
        lora_output (`str`, defaults to "merged"): for a LoRA run (`checkpoint-N/` folders of PEFT adapters), write
            the average as a full model folder ("merged") or as a PEFT adapter folder ("adapter"). Every method
            applies: the output is W0 + s·Σ wᵢ·Bᵢ·Aᵢ with the method's effective weights (BEMA and EMA included:
            TRL's op-by-op replay needs full weights). The base model (W0) is `base_model`, else the one the
            adapter config names.
        lora_rank (`int`, *optional*): with `lora_output="adapter"`, truncate each module to this rank by SVD (the
            provenance records each module's relative error); by default the adapter is lossless (rank r × K).
        lora_average (`str`, defaults to "exact"): "factors" averages A and B separately instead, what a naive
            script would do (the provenance records each module's relative difference from the exact average).
        revisions (`str`, *optional*): for a Hub run published as revisions (Pythia, OLMo): names or patterns,
            `"step1000,step2000"` or `"step*"`.
        keep_downloads (`bool`, defaults to True): for a Hub run, keep the downloaded checkpoints in huggingface_hub's
            cache. False deletes each one once read: the engine then goes step by step (`engine.stepwise`), with its
            running state on disk beside the output (4 bytes per element per θ0, EMA and weighted sum).
        hub_api (`HfApi`, *optional*): the client that lists a Hub run (tests pass a fake one).

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
    budget = parse_size(max_memory, option="--max-memory", minimum=MIN_MEMORY, unit_required=True)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    check_device(device)
    shard_size = parse_size(max_shard_size, option="--max-shard-size")
    configs = [("", schedule)] if isinstance(schedule, (BEMASchedule, Method)) else list(schedule)
    with open_run(checkpoint_dir, output, revisions=revisions, keep_downloads=keep_downloads, api=hub_api, progress=progress) as (run_dir, hub):
        if hub is not None and (resume or distributed) and not hub.keep:
            raise UsageError("--no-keep-downloads goes step by step in one process: leave out --resume and torchrun")
        return _average(
            run_dir, output, configs, hub=hub, base_model=base_model, save=save, steps=steps, min_step=min_step,
            max_step=max_step, allow_missing=allow_missing, accum_dtype=accum_dtype, dtype=dtype, budget=budget,
            shard_size=shard_size, overwrite=overwrite, dry_run=dry_run, progress=progress, resume=resume, threads=threads,
            device=device, distributed=distributed, lora_output=lora_output, lora_rank=lora_rank, lora_average=lora_average,
        )


@contextlib.contextmanager
def open_run(
    run: str | Path | HubDownloads,
    output: str | Path,
    *,
    revisions: str | None = None,
    keep_downloads: bool = True,
    api: Any | None = None,
    progress: bool = False,
) -> Iterator[tuple[Path, HubDownloads | None]]:
    """A run as a local folder of `checkpoint-N/` folders, and its downloads when it is on the Hub.

    A local folder is itself. `hf://ORG/NAME[@REVISION]` is a run pushed with `hub_strategy="all_checkpoints"`, or
    with `revisions`, one published as revisions; it becomes a folder of links into huggingface_hub's cache (beside
    `output`, removed at the end), and only the files of the steps a plan reads are downloaded, one step ahead of the
    reader (`sources.hub.HubDownloads`). An open `HubDownloads` is passed through (the command line opens it first,
    to read the run's cadence).

    Yields:
        `(Path, HubDownloads | None)`: the run folder, and its downloads for a Hub run.
    """
    if isinstance(run, HubDownloads):
        yield run.folder, run
        return
    if not is_hub_url(run):
        if revisions is not None:
            raise UsageError(f"--revisions applies to runs on the Hub (hf://ORG/NAME), not to the folder {run}")
        yield Path(run), None
        return
    listed = open_hub_run(str(run), revisions=revisions, api=api)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    log = (lambda line: print(line, file=sys.stderr)) if progress else None
    with HubDownloads(listed, Path(output).parent, keep=keep_downloads, api=api, log=log) as hub:
        hub.prepare()
        yield hub.folder, hub


def _average(
    checkpoint_dir: Path,
    output: Path,
    configs: list,
    *,
    hub: HubDownloads | None,
    base_model: str | Path | None,
    save: Sequence[str],
    steps: str | Sequence[int],
    min_step: int | None,
    max_step: int | None,
    allow_missing: bool,
    accum_dtype: str,
    dtype: str | None,
    budget: int,
    shard_size: int,
    overwrite: bool,
    dry_run: bool,
    progress: bool,
    resume: bool,
    threads: int | None,
    device: str,
    distributed: bool,
    lora_output: str,
    lora_rank: int | None,
    lora_average: str,
) -> AverageResult:
    """`average` on a local run folder (or a Hub run's, with its downloads)."""
    if hub is not None and is_adapter_folder(hub.folder / f"checkpoint-{max(hub.run.checkpoints)}"):
        # an adapter run: its (small) checkpoints are all fetched before planning
        for step in sorted(hub.run.checkpoints):
            hub.fetch(step)
    plan = make_plan(
        checkpoint_dir,
        configs,
        base_model=str(base_model) if base_model is not None else None,
        resolve_base=resolve_base_model,
        save=save,
        steps=steps,
        min_step=min_step,
        max_step=max_step,
        allow_missing=allow_missing,
        dtype=dtype,
        lora_output=lora_output,
        lora_rank=lora_rank,
        lora_average=lora_average,
        load=(lambda folder, step: hub.source(step)) if hub is not None else None,
        on_needed=(lambda needed: setattr(hub, "order", needed)) if hub is not None else None,
    )
    if hub is not None:
        plan.origin = hub.run.url
        plan.notes[:0] = hub.run.notes
    if plan.lora is not None and check_device(device) != "cpu":
        raise UsageError(f"--device {device}: the products of a LoRA run are computed on the CPU; leave out --device")
    if plan.lora is not None and distributed:
        raise UsageError("a LoRA run is averaged in one process (its base model is read once): run it without torchrun")
    outputs = [
        AveragedModel(output / spec.relpath if spec.relpath else output, spec.step, spec.kind, spec.config or None, spec.weights)
        for spec in plan.outputs
    ]
    source_folders = [source.folder for source in plan.sources.values()]
    check_output(output, overwrite=overwrite, run_dir=plan.run_dir, source_folders=source_folders)
    if dry_run:
        return AverageResult(plan, outputs, written=False)

    settings = {
        "accum_dtype": accum_dtype, "dtype": dtype, "max_memory": budget, "max_shard_size": shard_size, "allow_missing": allow_missing,
    }
    share = join() if distributed else None
    if share is not None:  # one of several ranks (torchrun)
        if resume:
            share.close()
            raise UsageError("--resume is not supported in a distributed run yet; rerun without it (the partial output is rebuilt)")
        try:
            leftovers = _average_shared(share, plan, output, settings, overwrite=overwrite, progress=progress, threads=threads, device=device)
        finally:
            share.close()
        return AverageResult(plan, outputs, written=True, removed_leftovers=leftovers)
    with OutputLock(output) as lock:
        fault_point("lock")
        try:
            staging = prepare_staging(output, _fingerprint(plan, settings), resume=resume)
            fault_point("staging")
            reused, bytes_read = _write_outputs(
                plan, staging.path, settings, progress=progress, journal=staging, threads=threads, device=device, hub=hub
            )
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
        plan, outputs, written=True, removed_leftovers=staging.removed_leftovers, reused_shards=reused, resume_note=staging.note,
        bytes_read=bytes_read,
    )


def _average_shared(
    share: Share,
    plan: Plan,
    output: Path,
    settings: dict,
    *,
    overwrite: bool,
    progress: bool,
    threads: int | None,
    device: str,
) -> bool:
    """One rank's part of a distributed run: rank 0 locks, stages and publishes; every rank writes its own shards.
    Returns whether leftovers of an interrupted run were removed."""
    digests = share.sync("planning", value=plan_digest(plan))
    if len(set(digests)) > 1:
        rank = next(r for r, digest in enumerate(digests) if digest != digests[0])
        raise DataError(f"rank {rank} planned another run than rank 0: every node must see the same files at the same paths")
    source_folders = [source.folder for source in plan.sources.values()]
    specs = _tensor_specs(plan)
    layout = shard_layout(specs, settings["max_shard_size"])
    owned = assign_shards({shard.name: shard.file_size for shard in layout}, share.world_size)
    if share.is_main and len(layout) < share.world_size:
        plan.notes.append(
            f"{len(layout)} output shards for {share.world_size} ranks: {share.world_size - len(layout)} ranks had no work; "
            "a smaller --max-shard-size spreads the work (ranks own whole shards)"
        )
    if device == "cuda":
        device = f"cuda:{share.local_rank}"
    with contextlib.ExitStack() as stack:

        def prepare() -> tuple[OutputLock, Staging]:
            lock = stack.enter_context(OutputLock(output))
            return lock, prepare_staging(output, _fingerprint(plan, settings), resume=False)

        prepared = share.run("preparing the output", prepare, main_only=True)
        try:
            writers, frozen = share.run(
                "writing its shards",
                lambda: _write_shards(
                    plan, staging_path(output), settings, layout=layout, mine=owned[share.rank], index=share.is_main,
                    progress=progress and share.is_main, threads=threads, device=device,
                ),
            )

            def finish() -> bool:
                lock, staging = prepared
                _finish_folders(plan, settings, writers, frozen)
                check_output(output, overwrite=overwrite, run_dir=plan.run_dir, source_folders=source_folders)
                staging.remove_resume_files()
                with interrupts_deferred():
                    publish(staging.path, output, overwrite=overwrite)
                    lock.release()
                return staging.removed_leftovers

            leftovers = share.run("publishing", finish, main_only=True)
        except BaseException:
            if share.is_main:
                discard(staging_path(output))
            raise
    return bool(leftovers)


def _fingerprint(plan: Plan, settings: dict) -> dict:
    """What the output bytes depend on (see `output.resume`): the plan's fingerprint, and for a LoRA run the
    adapter config (its files' sizes and times are among the inputs) and the options that shape the output."""
    fingerprint = plan_fingerprint(plan, settings)
    if plan.lora is not None:
        lora = plan.lora
        fingerprint["lora"] = {
            "output": lora.output, "rank": lora.rank, "average": lora.average, "config": lora.run.layout.config.raw,
            "untied": lora.run.layout.untied,
        }
    return fingerprint


def _tensor_specs(plan: Plan) -> list[TensorSpec]:
    return [TensorSpec(info.name, plan.output_dtypes[info.name], info.shape) for info in plan.tensors]


def _write_outputs(
    plan: Plan,
    staging: Path,
    settings: dict,
    *,
    progress: bool,
    journal: Staging,
    threads: int | None = None,
    device: str = "cpu",
    hub: HubDownloads | None = None,
) -> tuple[int, int]:
    """Write every output folder under `staging`; returns the number of shards reused from an interrupted run, and
    the input bytes read."""
    if plan.lora is not None and plan.lora.output == "adapter":
        return 0, _write_adapters(plan, staging, settings)
    layout = shard_layout(_tensor_specs(plan), settings["max_shard_size"])
    keep = journal.reusable_shards([spec.relpath for spec in plan.outputs], layout)
    with ShardFlusher() as flusher:  # the last shards reach the disk while the card and the rest are written
        writers, frozen = _write_shards(
            plan, staging, settings, layout=layout, keep=keep, on_shard_done=journal.record_done, progress=progress,
            threads=threads, device=device, flusher=flusher, hub=hub,
        )
        _finish_folders(plan, settings, writers, frozen)
    return len(keep), _todo(plan, layout, keep).bytes_to_read


def _todo(plan: Plan, layout: list[ShardLayout], keep: Collection[str], mine: Collection[str] | None = None) -> Plan:
    """The plan narrowed to the tensors of the shards still to write: not in `keep`, and in `mine` when given."""
    shards = [shard for shard in layout if shard.name not in keep and (mine is None or shard.name in mine)]
    names = {spec.name for shard in shards for spec in shard.tensors}
    return dataclasses.replace(plan, tensors=[info for info in plan.tensors if info.name in names])


def _write_shards(
    plan: Plan,
    staging: Path,
    settings: dict,
    *,
    layout: list[ShardLayout],
    keep: Collection[str] = (),
    mine: Collection[str] | None = None,
    on_shard_done: Callable[[Path], None] | None = None,
    index: bool = True,
    progress: bool,
    threads: int | None,
    device: str,
    flusher: ShardFlusher | None = None,
    hub: HubDownloads | None = None,
) -> tuple[list[ModelFolderWriter], list[str] | None]:
    """Compute the shards of every output folder: all but `keep` (finished by an interrupted run), or only `mine`
    (a rank's share of a distributed run). Each finished shard is flushed to disk, by `flusher` when given (wait
    on it before publishing), else before this returns. Returns the writers, and the tensors copied as frozen
    (`_frozen_tensors`)."""
    specs = _tensor_specs(plan)
    folders = [staging / spec.relpath if spec.relpath else staging for spec in plan.outputs]
    todo = _todo(plan, layout, keep, mine)
    with contextlib.ExitStack() as stack:
        # each output has its own files, which threads write at once (each shard is closed when complete)
        writers = [
            ModelFolderWriter(
                folder, specs, max_shard_size=settings["max_shard_size"], files=stack.enter_context(OpenFiles(writable=True, max_open=None)),
                keep_shards=keep, on_shard_done=on_shard_done, shards=mine, flusher=flusher,
            )
            for folder in folders
        ]
        options = {"accum_dtype": settings["accum_dtype"], "max_memory": settings["max_memory"], "threads": threads}
        with _progress_bars(todo, enabled=progress) as on_progress:
            if plan.lora is not None:
                from .engine.lora_engine import LoraEngine  # (torch: only for a LoRA run)

                engine = LoraEngine(todo, FolderSink(writers), device=device, on_progress=on_progress, **options)
            elif hub is not None and not hub.keep:  # --no-keep-downloads: one checkpoint on disk at a time
                from .engine.stepwise import StepwiseEngine

                engine = StepwiseEngine(
                    todo, FolderSink(writers), state_dir=state_path(output_of(staging)), on_progress=on_progress,
                    fetch=lambda step: hub.fetch(step) if step in hub.run.checkpoints else plan.sources[step],
                    release=hub.release, **options,
                )
            else:
                engine = Engine(todo, FolderSink(writers), device=device, on_progress=on_progress, **options)
            engine.run()
        check_unchanged(plan.identities)  # a checkpoint rewritten during the run would mix two versions
        for writer in writers:
            writer.finish(index=index)
    return writers, _frozen_tensors(plan, todo, engine, settings, hub)


def _finish_folders(plan: Plan, settings: dict, writers: list[ModelFolderWriter], frozen: list[str] | None) -> None:
    """Check every output folder's shards, then add the sidecar files, the provenance (with the tensors copied as
    frozen, when known) and the model card."""
    expected = {spec.name: (spec.dtype, spec.shape) for spec in _tensor_specs(plan)}
    training = run_training(plan)
    untie = plan.lora is not None and bool(plan.lora.run.layout.untied)
    for writer, spec in zip(writers, plan.outputs):
        folder = writer.folder
        check_folder(folder, expected=expected)  # the light verify, before anything is published
        copy_sidecar_files(plan.sidecars.get(spec.step, {}), folder, dtype=settings["dtype"], untie_embeddings=untie)
        record = provenance(plan, spec, settings=settings, training=training)
        if frozen is not None:
            record["frozen_tensors"] = frozen
        if plan.lora is not None and plan.lora.average == "factors":
            record["lora"]["factor_differences"] = _factor_differences(plan, spec)
        record["output_files"] = output_files(folder, writer.digests())  # the shards hashed as written; others are read
        replace_file(folder / PROVENANCE_FILE, (json.dumps(record, indent=2) + "\n").encode())
        write_card(folder, record)
        fault_point("sidecars")


def _frozen_tensors(plan: Plan, todo: Plan, engine: object, settings: dict, hub: HubDownloads | None) -> list[str] | None:
    """The tensors the run copied as frozen (bit-identical in every source it read: `frozen.py`), for the record:
    the engine's decision when it saw every tensor, else decided again over the whole plan (a resumed or distributed
    run's engine saw part of it; the answer depends on the inputs alone), or None where the sources are gone
    (`--no-keep-downloads`). `verify --recompute` recomputes with this decision: an output of a sweep or of
    `--every-update` was decided over every checkpoint the run read, not its own alone."""
    if plan.lora is not None:
        return None
    if len(todo.tensors) == len(plan.tensors):
        decided = getattr(engine, "frozen", None)
        decided = getattr(engine, "candidates", None) if decided is None else decided
        if decided is not None:
            return sorted(decided)
    if hub is not None and not hub.keep:
        return None
    from .engine.frozen import frozen_tensors

    with OpenFiles(identities=plan.identities) as files:
        return sorted(frozen_tensors(plan.sources.values(), [info.name for info in plan.tensors], files, max_memory=settings["max_memory"]))


def _factor_differences(plan: Plan, spec: OutputSpec) -> dict[str, float]:
    """With `--lora-average factors`, each module's relative Frobenius difference from the exact average."""
    from .engine.lora import factor_differences

    with OpenFiles(identities=plan.identities) as files:
        return factor_differences(plan.lora.run, spec.weights, files)


def _write_adapters(plan: Plan, staging: Path, settings: dict) -> int:
    """`--lora-output adapter`: write each output as a PEFT adapter folder, with the tokenizer, the provenance and
    the card; returns the input bytes read. Adapters are small: a resumed run writes them again.

    Each adapter is computed on one torch thread: the float64 QR and SVD of `--lora-rank` give other bits on other
    thread counts, and `verify --recompute` writes the adapter again, on one thread, to compare it byte for byte."""
    import torch

    from .output.adapter import full_block_rows, write_adapter

    lora = plan.lora
    training = run_training(plan)
    accum_dtype = torch.float64 if settings["accum_dtype"] == "float64" else torch.float32
    block_rows = full_block_rows(lora.run, lora.base, settings["max_memory"], accum_dtype=accum_dtype)
    for spec in plan.outputs:
        folder = staging / spec.relpath if spec.relpath else staging
        for leftover in (folder / ADAPTER_CONFIG, folder / ADAPTER_SAFETENSORS):  # of an interrupted run
            leftover.unlink(missing_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            report = write_adapter(
                folder, lora.run, lora.base, spec.weights, rank=lora.rank, mode=lora.average, dtype=FLOAT_DTYPES.get(settings["dtype"]),
                base_model=_adapter_base_name(plan), block_rows=block_rows, accum_dtype=accum_dtype, exist_ok=True,
            )
        finally:
            torch.set_num_threads(threads)
        written = load_adapter_checkpoint(folder, spec.step)  # the light verify: its config and header read back as an adapter
        tokenizer = {name: path for name, path in plan.sidecars.get(spec.step, {}).items() if name not in MODEL_SIDECARS}
        copy_sidecar_files(tokenizer, folder)
        record = provenance(plan, spec, settings=settings, training=training)
        record["lora"].update(report.provenance())
        record["tensors"] = len(written.shapes)
        record["output_files"] = output_files(folder)  # the adapter's weights and its config, with their sha256
        replace_file(folder / PROVENANCE_FILE, (json.dumps(record, indent=2) + "\n").encode())
        write_card(folder, record)
        fault_point("sidecars")
    check_unchanged(plan.identities)
    return plan.bytes_to_read * len(plan.outputs)


def _adapter_base_name(plan: Plan) -> str:
    """How an adapter output names its base model: a Hub id as given, else the local folder's absolute path."""
    name = plan.base_model or str(plan.lora.base.folder)
    return name if is_hub_id(name) else str(Path(name).expanduser().resolve())


class _progress_bars:
    """Two tqdm bars, bytes read and tensors finished, fed by the engine's progress callback."""

    def __init__(self, plan: Plan, *, enabled: bool) -> None:
        self.enabled = enabled
        self.plan = plan

    def __enter__(self):
        if not self.enabled:
            return None
        # disable=None: no bars (and no escape codes) when stderr is not a terminal
        self.bytes_bar = tqdm(total=self.plan.bytes_to_read, unit="B", unit_scale=True, unit_divisor=1024, desc="read", disable=None)
        self.tensor_bar = tqdm(total=len(self.plan.tensors), unit="tensor", desc="tensors", disable=None)

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
