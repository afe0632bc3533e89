"""`verify` for the outputs of a LoRA run: a merged model folder, or a PEFT adapter folder (`--lora-output adapter`).

The sources that `bema_offline.json` names for such an output are the base model (step 0, W0 of every checkpoint:
it is read even where the method gives it no weight) and adapter checkpoints, which hold factors, not weights. Verify
rebuilds the run from them as `bema-average` read it (`load_adapter_run` on the base), checks that the record's
description of the adapter still follows from them, and then checks the output against the run:

- a merged output holds exactly the base's tensors (and a head untied from its embedding), with the base's shapes
  and the planned dtypes. `recompute` recomputes K random tensors with the same `LoraEngine`, whose bits depend
  neither on `--max-memory` nor on the threads, and compares every slice bit for bit;
- an adapter output fits the base as peft maps it (`map_adapter`: every factor's shape and rank), and holds the
  run's keys, each module at the rank the options give it, in the planned dtypes. `recompute` writes the adapter
  again (`write_adapter`) into a temporary folder and compares both of its files byte for byte, and the ranks and
  truncation errors recorded.

Every problem raises a `DataError` whose one line names the file, tensor or field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..dtypes import FLOAT_DTYPES
from ..engine.lora_engine import LoraEngine
from ..engine.plan import LoraPlan, OutputSpec, Plan
from ..errors import DataError
from ..files import OpenFiles, file_identity, read_json_file
from ..sources.peft import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, load_adapter_checkpoint, load_adapter_run, map_adapter
from ..sources.run import BASE_STEP, load_source
from ..sources.safetensors_io import read_header
from ..sources.tensors import TensorInfo, WeightSource
from .adapter import full_block_rows, output_rank, write_adapter
from .card import PROVENANCE_FILE, lora_record
from .verify import CompareSink, FolderReport, planned_dtype, recorded_sources_changed, recorded_sources_gone

COMPARE_BYTES = 8 * 2**20  # the largest read when two files are compared


def check_lora_output(
    report: FolderReport, record: dict, tensors: dict[str, TensorInfo], *, recompute: int, seed: int | None, max_memory: int
) -> None:
    """Check a LoRA run's output against its sources, and recompute it; fills `report` (sources, recomputed, notes).

    Args:
        report (`FolderReport`): the folder's report so far (its light check, values and provenance done).
        record (`dict`): its provenance record, as `read_provenance` returns it.
        tensors (`dict[str, TensorInfo]`): the folder's tensors.
        recompute (`int`): how many random tensors of a merged output to recompute (any number above 0 writes an
            adapter output again, whole).
        seed (`int`, *optional*): seed of the random choice of tensors.
        max_memory (`int`): working memory for tensor data.
    """
    folder = report.folder
    report.notes += recorded_sources_changed(record, folder)
    gone = recorded_sources_gone(record)
    if gone:
        report.notes.append(f"{folder}: {len(gone)} source folders are gone (e.g. {gone[0]}); the output was not compared with its sources")
        if recompute > 0:
            raise DataError(f"{folder}: cannot recompute, some sources named in {PROVENANCE_FILE} are gone")
        return
    plan, base_config = recorded_plan(record, folder)
    if report.adapter:
        check_adapter_against_run(folder, record, plan, base_config)
    else:
        check_merged_against_run(folder, tensors, plan)
    report.sources_checked = sorted(plan.sources)
    if recompute <= 0:
        return
    if report.adapter:
        rewrite_adapter(folder, record, plan, max_memory=max_memory)
        report.recomputed = sorted(tensors)
    else:
        names = random.Random(seed).sample(sorted(tensors), min(recompute, len(tensors)))
        recompute_merged(folder, record, tensors, plan, names, max_memory=max_memory)
        report.recomputed = names


# --- the run, rebuilt from the record -----------------------------------------------------------------------------


def recorded_plan(record: dict, folder: Path) -> tuple[Plan, dict | None]:
    """The plan of the recorded output alone: its base model and adapter checkpoints (as the record names them),
    its effective weights and the options that shaped it; and the base's `config.json` (None without one).

    Raises:
        `DataError`: a source that cannot be read, checkpoints that disagree, or a record whose description of the
            adapter does not follow from them.
    """
    inputs = record["_inputs"]
    checkpoints = {step: source_folder for step, (source_folder, _) in inputs.items() if step != BASE_STEP}
    if not checkpoints:
        raise DataError(f"{folder / PROVENANCE_FILE}: names no adapter checkpoint among its inputs; it was edited or damaged")
    base_folder = inputs[BASE_STEP][0]
    base = load_source(base_folder, BASE_STEP)
    config_path = base_folder / "config.json"
    base_config = read_json_file(config_path, what="model config", hint="fix it") if config_path.is_file() else None
    base_config = base_config if isinstance(base_config, dict) else None
    run = load_adapter_run(checkpoints, base, base_config=base_config)
    lora = record["_lora"]
    output = OutputSpec(None, record["kind"], record["step"], "", record["_weights"], "", record["_method"])
    tensors = [
        base.tensors[theta0] if name == theta0 else dataclasses.replace(base.tensors[theta0], name=name)
        for name, theta0 in run.layout.output_tensors(base).items()
    ]
    sources: dict[int, WeightSource] = {BASE_STEP: base}
    for step, checkpoint in run.checkpoints.items():
        checkpoint.identities[checkpoint.config.path] = file_identity(checkpoint.config.path)
        sources[step] = checkpoint.source or WeightSource(step, checkpoint.folder, {}, checkpoint.identities, layout="peft adapter (.bin)")
    plan = Plan(
        run_dir=Path(record.get("run_dir") or "."),
        found_steps=sorted(checkpoints),
        schedules=[],
        outputs=[output],
        sources=sources,
        tensors=tensors,
        output_dtypes={info.name: planned_dtype(record, info) for info in tensors},
        base_model=record.get("base_model"),
        lora=LoraPlan(run, base, output=lora["output"], rank=lora["rank"], average=lora["average"]),
    )
    _check_adapter_record(folder, lora.get("adapter"), lora_record(plan)["adapter"])
    return plan, base_config


def _check_adapter_record(folder: Path, recorded: object, rebuilt: dict) -> None:
    """The record's description of the adapter (rank, alpha, targets, ...) is the checkpoints' (the path of the config
    it was read from aside: another checkpoint of the run may have been the first read)."""
    path = folder / PROVENANCE_FILE
    if not isinstance(recorded, dict):
        raise DataError(f"{path}: its lora entry does not describe the adapter; it was edited or damaged")
    for key, value in rebuilt.items():
        if key != "config" and recorded.get(key) != json.loads(json.dumps(value)):  # (as JSON reads it back)
            raise DataError(
                f"{path}: lora.adapter.{key} is {recorded.get(key)!r} but the checkpoints it names say {value!r}; the record "
                "was edited or the checkpoints changed since"
            )


# --- checks against the run ---------------------------------------------------------------------------------------


def check_merged_against_run(folder: Path, tensors: dict[str, TensorInfo], plan: Plan) -> None:
    """A merged output holds every tensor of the base (and the heads the adapters untie), with the base's shapes and
    the planned dtypes, and nothing else."""
    base = plan.lora.base
    planned = {info.name: info for info in plan.tensors}
    for name, info in tensors.items():
        expected = planned.get(name)
        if expected is None:
            raise DataError(f"{info.path}: tensor {name!r} is neither in the base model {base.folder} nor made by the adapters")
        if info.shape != expected.shape:
            raise DataError(f"{info.path}: tensor {name!r} is {list(info.shape)} but {list(expected.shape)} in the base model {base.folder}")
        if info.dtype != plan.output_dtypes[name]:
            raise DataError(
                f"{info.path}: tensor {name!r} is {info.dtype} but {plan.output_dtypes[name]} as planned (the base model's "
                f"{expected.dtype} and the recorded --dtype)"
            )
    missing = next((name for name in planned if name not in tensors), None)
    if missing is not None:
        raise DataError(f"{folder}: tensor {missing!r} of the base model {base.folder} is missing from the output")


def adapter_specs(plan: Plan, dtype: str | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors of the adapter output of `plan` (key to dtype and shape), as `write_adapter` makes them: each
    module's factors at its output rank, the `lora_B` biases and the tensors trained in full in `dtype` (default:
    the checkpoints'), peft's frozen copies of base layers as the checkpoints hold them."""
    lora = plan.lora
    layout, newest = lora.run.layout, lora.run.checkpoints[max(lora.run.checkpoints)]
    weights = plan.outputs[0].weights
    specs = {}
    for module in layout.modules.values():
        rank = output_rank(module, weights, rank=lora.rank, mode=lora.average)
        (a_dtype, a_shape), (b_dtype, b_shape) = newest.shapes[module.lora_A], newest.shapes[module.lora_B]
        specs[module.lora_A] = (dtype or a_dtype, (rank, a_shape[1]))
        specs[module.lora_B] = (dtype or b_dtype, (b_shape[0], rank))
        if module.lora_bias is not None:
            specs[module.lora_bias] = (dtype or newest.shapes[module.lora_bias][0], newest.shapes[module.lora_bias][1])
    for tensor in layout.full_tensors.values():
        specs[tensor.key] = (dtype or newest.shapes[tensor.key][0], newest.shapes[tensor.key][1])
    for key in layout.saved_base_layers:
        specs[key] = newest.shapes[key]
    return specs


def check_adapter_against_run(folder: Path, record: dict, plan: Plan, base_config: Mapping[str, object] | None) -> None:
    """An adapter output fits the base model as peft maps it, holds the run's keys at the ranks the options give
    (those the record lists), in the planned dtypes."""
    adapter = load_adapter_checkpoint(folder, BASE_STEP)
    layout = map_adapter(adapter, plan.lora.base, base_config=base_config)  # every factor fits the base
    specs = adapter_specs(plan, FLOAT_DTYPES.get(record["settings"].get("dtype")))
    where = folder / ADAPTER_SAFETENSORS
    for key, (dtype, shape) in adapter.shapes.items():
        if key not in specs:
            raise DataError(f"{where}: tensor {key!r} is not one of the run's adapters ({plan.lora.run.checkpoints[max(plan.lora.run.checkpoints)].weights_file})")
        if (dtype, shape) != specs[key]:
            raise DataError(f"{where}: tensor {key!r} is {dtype} {list(shape)}, but {specs[key][0]} {list(specs[key][1])} as planned")
    missing = next((key for key in specs if key not in adapter.shapes), None)
    if missing is not None:
        raise DataError(f"{where}: tensor {missing!r} of the run's adapters is missing from the output")
    ranks = {module.module: module.rank for module in layout.modules.values()}
    if record["_lora"].get("ranks") != ranks:
        raise DataError(f"{folder / PROVENANCE_FILE}: lora.ranks are not the adapter's ranks; it was edited or damaged")


# --- recompute ----------------------------------------------------------------------------------------------------


def recompute_merged(folder: Path, record: dict, tensors: dict[str, TensorInfo], plan: Plan, names: list[str], *, max_memory: int) -> None:
    """Recompute `names` of a merged output with the LoRA engine, and compare every slice bit for bit."""
    wanted = set(names)
    narrowed = dataclasses.replace(plan, tensors=[info for info in plan.tensors if info.name in wanted])
    accum = record["settings"].get("accum_dtype")
    sink = CompareSink(tensors)
    try:
        LoraEngine(narrowed, sink, accum_dtype=accum if accum in ("float32", "float64") else "float32", max_memory=max(max_memory, 2**20)).run()
    finally:
        sink.files.close()
    short = [name for name in names if sink.compared.get(name, 0) != tensors[name].numel]
    if short:
        raise DataError(f"{tensors[short[0]].path}: tensor {short[0]!r} was not fully recomputed; report this bug")
    if plan.lora.average == "factors":
        from ..engine.lora import factor_differences

        with OpenFiles(identities=plan.identities) as files:
            differences = factor_differences(plan.lora.run, plan.outputs[0].weights, files)
        _check_diagnostics(folder, record, {"factor_differences": differences})


def rewrite_adapter(folder: Path, record: dict, plan: Plan, *, max_memory: int) -> None:
    """Write the adapter output of `plan` again into a temporary folder, and compare both files byte for byte, and
    the ranks, truncation errors and factor differences the record gives."""
    lora, settings = plan.lora, record["settings"]
    accum = torch.float64 if settings.get("accum_dtype") == "float64" else torch.float32
    with tempfile.TemporaryDirectory(prefix="bema-verify-") as scratch, one_torch_thread():
        fresh = Path(scratch) / "adapter"
        report = write_adapter(
            fresh, lora.run, lora.base, plan.outputs[0].weights, rank=lora.rank, mode=lora.average,
            dtype=FLOAT_DTYPES.get(settings.get("dtype")), base_model=record.get("base_model"),
            block_rows=full_block_rows(lora.run, lora.base, max_memory, accum_dtype=accum), accum_dtype=accum,
        )
        compare_adapter_weights(folder / ADAPTER_SAFETENSORS, fresh / ADAPTER_SAFETENSORS)
        compare_adapter_config(folder / ADAPTER_CONFIG, fresh / ADAPTER_CONFIG)
    _check_diagnostics(folder, record, report.provenance())


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the block: the float64 QR and SVD of `--lora-rank` give other bits on other thread
    counts (as `bema-average` writes them; see `api._write_adapters`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_diagnostics(folder: Path, record: dict, computed: Mapping[str, object]) -> None:
    """The record's ranks, truncation errors and factor differences are those computed again (the errors, floats
    derived from the output, within 1e-9 relative)."""
    recorded = record["_lora"]
    for key, value in computed.items():
        want = recorded.get(key)
        same = want == value
        if isinstance(value, dict) and isinstance(want, dict) and not same and set(want) == set(value):
            same = all(_close(want[k], value[k]) for k in value)
        elif isinstance(value, float) and not same:
            same = _close(want, value)
        if not same:
            raise DataError(f"{folder / PROVENANCE_FILE}: lora.{key} differs from its recomputation; it was edited or damaged")


def _close(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def compare_adapter_weights(stored: Path, fresh: Path) -> None:
    """`stored` holds the bytes of `fresh`, its recomputation; else name the first tensor (and element) that differs."""
    offset = first_difference(stored, fresh)
    if offset is None:
        return
    tensors, _ = read_header(stored)
    recomputed, _ = read_header(fresh)
    for name, info in sorted(tensors.items(), key=lambda item: item[1].start):
        other = recomputed.get(name)
        if other is None or (other.dtype, other.shape) != (info.dtype, info.shape):
            shown = "missing" if other is None else f"{other.dtype} {list(other.shape)}"
            raise DataError(f"{stored}: tensor {name!r} is {info.dtype} {list(info.shape)} but {shown} in its recomputation; do not use it")
    extra = next((name for name in recomputed if name not in tensors), None)
    if extra is not None:
        raise DataError(f"{stored}: tensor {extra!r} of its recomputation is missing; do not use it")
    inside = next((info for info in tensors.values() if info.start <= offset < info.start + info.nbytes), None)
    if inside is None or recomputed[inside.name].start != inside.start:
        raise DataError(f"{stored}: its header differs from its recomputation's at byte {offset}; the file was edited: do not use it")
    raise DataError(
        f"{stored}: tensor {inside.name!r} differs from its recomputation at element {(offset - inside.start) // inside.itemsize}; "
        "the output is wrong or its sources changed: do not use it"
    )


def compare_adapter_config(stored: Path, fresh: Path) -> None:
    """`stored` is byte for byte the config written again; else name the first field that differs."""
    if first_difference(stored, fresh) is None:
        return
    written = read_json_file(stored, what="adapter config", hint="it was edited")
    recomputed = read_json_file(fresh, what="adapter config", hint="report this bug")
    if isinstance(written, dict) and isinstance(recomputed, dict):
        key = next((k for k in sorted(set(written) | set(recomputed)) if written.get(k, ...) != recomputed.get(k, ...)), None)
        if key is not None:
            raise DataError(
                f"{stored}: {key} is {written.get(key)!r} but {recomputed.get(key)!r} in its recomputation; the file was edited "
                "or its sources changed: do not use it"
            )
    raise DataError(f"{stored}: differs from its recomputation (its layout, not its fields); the file was edited")


def first_difference(a: Path, b: Path, *, chunk: int = COMPARE_BYTES) -> int | None:
    """The offset of the first byte where two files differ (the shorter one's length when one is a prefix of the
    other), or None when they are the same bytes; read in pieces of `chunk` bytes."""
    offset = 0
    with open(a, "rb") as first, open(b, "rb") as second:
        while True:
            left, right = first.read(chunk), second.read(chunk)
            if left != right:
                return offset + next((i for i, (x, y) in enumerate(zip(left, right)) if x != y), min(len(left), len(right)))
            if not left:
                return None
            offset += len(left)
