"""Frozen tensors are decided per whole tensor, by bits, before anything is computed: the output of a tensor that
changed anywhere never depends on the budget, the threads or a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic import make_run

from bema_offline import BEMASchedule, average
from bema_offline.engine.frozen import FIRST_CHUNK, frozen_tensors
from bema_offline.files import OpenFiles
from bema_offline.output.verify import verify
from bema_offline.sources.run import load_source

EMBED = "model.embed_tokens.weight"


def _sources(folders: list[Path]):
    return [load_source(folder, step) for step, folder in enumerate(folders)]


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    return folder


def _frozen(tmp_path: Path, versions: list[dict[str, torch.Tensor]]) -> set[str]:
    folders = [_write(tmp_path / f"s{i}", tensors) for i, tensors in enumerate(versions)]
    sources = _sources(folders)
    with OpenFiles() as files:
        return frozen_tensors(sources, list(versions[0]), files)


def test_identical_float_tensors_are_frozen_and_others_are_not(tmp_path: Path) -> None:
    same = torch.randn(7, 5)
    moving = torch.randn(7, 5)
    versions = [
        {"same": same, "moving": moving, "ids": torch.arange(4)},
        {"same": same.clone(), "moving": moving + 1e-3, "ids": torch.arange(4)},
    ]
    assert _frozen(tmp_path, versions) == {"same"}  # non-float tensors are copied anyway, never "frozen"


def test_signed_zeros_and_nan_payloads_count_as_changes(tmp_path: Path) -> None:
    zeros = torch.zeros(6)
    negative = zeros.clone()
    negative[3] = -0.0
    assert torch.equal(zeros, negative)  # equal as numbers...
    assert _frozen(tmp_path / "zero", [{"t": zeros}, {"t": negative}]) == set()  # ...but not as bits
    nan = torch.full((4,), float("nan"))
    other = nan.clone().view(torch.int32)
    other[1] ^= 1  # another NaN payload
    assert _frozen(tmp_path / "nan", [{"t": nan}, {"t": other.view(torch.float32)}]) == set()
    assert _frozen(tmp_path / "same-nan", [{"t": nan}, {"t": nan.clone()}]) == {"t"}


def test_a_difference_deep_in_a_large_tensor_is_found(tmp_path: Path) -> None:
    big = torch.randn(FIRST_CHUNK * 20)  # many chunks, the last ones 4x larger each time
    last = big.clone()
    last[-1] += 1.0
    assert _frozen(tmp_path / "a", [{"t": big}, {"t": big.clone()}, {"t": last}]) == set()
    assert _frozen(tmp_path / "b", [{"t": big}, {"t": big.clone()}, {"t": big.clone()}]) == {"t"}


def test_another_dtype_is_not_frozen(tmp_path: Path) -> None:
    values = torch.randn(8)
    assert _frozen(tmp_path, [{"t": values}, {"t": values.to(torch.bfloat16)}]) == set()


@pytest.fixture()
def run_with_untouched_rows(tmp_path: Path):
    """A run whose embedding keeps its first 40 rows (of 50) unchanged, as a real fine-tune's unused tokens do."""
    run_dir, base_dir, weights = make_run(tmp_path, [1, 2, 3, 4])
    base_rows = weights[0][EMBED][:40].clone()
    for step in (1, 2, 3, 4):
        folder = run_dir / f"checkpoint-{step}"
        tensors = load_file(folder / "model.safetensors")
        tensors[EMBED][:40] = base_rows
        weights[step][EMBED] = tensors[EMBED]
        save_file(tensors, folder / "model.safetensors")
    return run_dir, base_dir, weights


def test_untouched_rows_are_averaged_with_their_tensor_at_any_budget_and_thread_count(run_with_untouched_rows, tmp_path: Path) -> None:
    run_dir, base_dir, weights = run_with_untouched_rows
    schedule = BEMASchedule(update_freq=1)
    outputs = []
    for budget, threads in [("1GiB", 1), ("4KiB", 1), ("4KiB", 2), ("8KiB", 2)]:
        out = tmp_path / f"out-{budget}-{threads}"
        average(run_dir, out, schedule=schedule, base_model=base_dir, max_memory=budget, threads=threads, save=("ema", "bema"))
        outputs.append({kind: load_file(out / kind / "model.safetensors") for kind in ("ema", "bema")})
    for other in outputs[1:]:
        for kind in ("ema", "bema"):
            for name, tensor in outputs[0][kind].items():
                assert torch.equal(tensor.view(torch.int32), other[kind][name].view(torch.int32)), (kind, name)
    # TRL's ops on the whole tensor: the untouched rows are replayed too, and rounding moves some of them
    theta0 = weights[0][EMBED].clone()
    ema = theta0.clone()
    for step in (1, 2, 3, 4):
        beta = schedule.beta(step)
        ema.mul_(1 - beta).add_(weights[step][EMBED], alpha=beta)
    assert torch.equal(outputs[0]["ema"][EMBED], ema)
    assert not torch.equal(ema[:40], theta0[:40])  # so copying the untouched rows would have been wrong
    # verify --recompute replays each output alone and agrees with the folder written beside the other
    for kind in ("ema", "bema"):
        verify(tmp_path / "out-4KiB-2" / kind, recompute=10, seed=0, max_memory=4096)


def test_a_frozen_tensor_is_copied_bit_for_bit_and_cast_for_dtype(tmp_path: Path) -> None:
    run_dir, base_dir, weights = make_run(tmp_path, [1, 2, 3], frozen=("model.norm.weight",))
    out = tmp_path / "out"
    average(run_dir, out, schedule=BEMASchedule(update_freq=1), base_model=base_dir, max_memory="4KiB")
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"], weights[0]["model.norm.weight"])
    cast = tmp_path / "cast"
    average(run_dir, cast, schedule=BEMASchedule(update_freq=1), base_model=base_dir, dtype="bfloat16")
    written = load_file(cast / "model.safetensors")["model.norm.weight"]
    assert written.dtype == torch.bfloat16 and torch.equal(written, weights[0]["model.norm.weight"].to(torch.bfloat16))
    record = json.loads((cast / "bema_offline.json").read_text())
    assert record["settings"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("max_memory", [None, 2**20])
def test_the_check_holds_two_sources_at_once_whatever_their_number(tmp_path: Path, max_memory) -> None:
    """An MoE's thousands of small tensors in 21 sources: compared with the first source one source at a time."""
    import tracemalloc

    tensors = {f"experts.{i}.w": torch.randn(256) for i in range(4096)}  # 1 KiB each, 4 MiB per source
    tensors["moving"] = torch.randn(256)
    first = _write(tmp_path / "s0", tensors)
    folders = [first] + [_write(tmp_path / f"s{i}", {**tensors, "moving": tensors["moving"] + i}) for i in range(1, 21)]
    sources = _sources(folders)
    tracemalloc.start()
    try:
        with OpenFiles() as files:
            frozen = frozen_tensors(sources, list(tensors), files, max_memory=max_memory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frozen == set(tensors) - {"moving"}
    assert peak <= 3 * (4 * 2**20 if max_memory is None else max_memory // 4) + 2**20, peak  # not 21 sources' worth


def test_an_output_of_every_update_step_verifies_with_the_run_s_frozen_decision(tmp_path: Path) -> None:
    """A tensor the same in the base and checkpoint-400 that changes at checkpoint-800 is not frozen for the run, so
    it is replayed in step-400/ too (where a run of that output alone copies it: the replay moves it by an ulp);
    the record says which tensors were copied, and `verify --recompute` recomputes with that decision instead of
    refusing a correct output."""
    from bema_offline.output.verify import read_provenance

    name = "model.norm.weight"
    run_dir, base_dir, weights = make_run(tmp_path, [400, 800])
    first = load_file(run_dir / "checkpoint-400" / "model.safetensors")
    first[name] = weights[0][name].clone()
    save_file(first, run_dir / "checkpoint-400" / "model.safetensors")
    out, alone = tmp_path / "out", tmp_path / "alone"
    average(run_dir, out, schedule=BEMASchedule(), base_model=base_dir, steps="every")
    average(run_dir, alone, schedule=BEMASchedule(), base_model=base_dir, max_step=400)
    replayed, copied = load_file(out / "step-400" / "model.safetensors")[name], load_file(alone / "model.safetensors")[name]
    assert torch.equal(copied, weights[0][name]) and not torch.equal(replayed, copied)  # within an ulp: see the README
    assert read_provenance(out / "step-400")["frozen_tensors"] == []  # decided over every checkpoint read
    assert read_provenance(alone)["frozen_tensors"] == [name]
    for folder in (out / "step-400", alone):
        (report,) = verify(folder, recompute=10, seed=0)
        assert name in report.recomputed
