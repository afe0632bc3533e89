"""`verify`: every check fires on the damage it is meant to catch, and passes on every kind of healthy output."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synthetic import make_run

from bema_offline import BEMASchedule, DataError, average
from bema_offline.dtypes import dtype_name
from bema_offline.files import OpenFiles, writable_view
from bema_offline.output.verify import check_folder, check_provenance, check_values, read_provenance, verify
from bema_offline.output.writer import ModelFolderWriter, TensorSpec
from bema_offline.sources.tensors import TensorInfo

NORM = "model.norm.weight"
UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def made(tmp_path):
    """A run and a sharded output of it; returns (run_dir, base_dir, output). Verify must never write: the base
    model, which no test damages, is unchanged afterwards."""
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6], extra={"position_ids": torch.arange(5)})
    output = tmp_path / "out"
    average(run_dir, output, schedule=BEMASchedule(update_freq=2), base_model=base_dir, max_shard_size="700B")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in base_dir.iterdir()}
    yield run_dir, base_dir, output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in base_dir.iterdir()} == before


def shard_of(output: Path, name: str) -> Path:
    index = json.loads((output / "model.safetensors.index.json").read_text())
    return output / index["weight_map"][name]


def poke(path: Path, name: str, element: int, value: float) -> None:
    """Overwrite one element of a tensor in place, bytes only (the header is untouched)."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8 : 8 + n])[name]
    assert entry["dtype"] == "F32"
    offset = 8 + n + entry["data_offsets"][0] + 4 * element
    data[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))


def edit_record(output: Path, change) -> None:
    path = output / "bema_offline.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


# --- healthy outputs pass, with every tensor recomputed ------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dtype": "bfloat16", "accum_dtype": "float64"},
        {"save": ("ema", "bema"), "steps": "every"},
        {"schedule": BEMASchedule(update_freq=2, update_after=2, ema_power=0.3)},
        {"schedule": BEMASchedule(update_after=2, convention="paper", min_ema_multiplier=1e-4)},
        {"schedule": [("a", BEMASchedule(update_freq=2)), ("b", BEMASchedule(update_freq=4, bias_power=0.0))]},
        {"schedule": BEMASchedule(update_freq=1), "allow_missing": True},
    ],
    ids=["default", "bf16-out-fp64-accum", "ema-bema-every-step", "theta0-checkpoint", "paper", "sweep", "allow-missing"],
)
def test_healthy_outputs_verify_and_recompute_bit_for_bit(tmp_path, options):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6, 8], extra={"position_ids": torch.arange(5)}, frozen=(NORM,))
    options = {"schedule": BEMASchedule(update_freq=2), **options}
    result = average(run_dir, tmp_path / "out", base_model=base_dir, max_shard_size="1KB", max_memory=4096, **options)
    reports = verify(tmp_path / "out", recompute=100, seed=0, max_memory=4096)
    assert sorted(r.folder for r in reports) == sorted(o.path for o in result.outputs)
    assert len(reports) == len(result.outputs) > 0
    for report in reports:
        assert report.has_provenance and report.tensors == 6 and report.shards > 1
        assert len(report.recomputed) == 6
        record = json.loads((report.folder / "bema_offline.json").read_text())
        assert report.sources_checked == [entry["step"] for entry in record["inputs"]]


def test_a_plain_model_folder_gets_the_structural_checks(tmp_path):
    run_dir, _, _ = make_run(tmp_path, [1], shards=2)
    (report,) = verify(run_dir / "checkpoint-1")
    assert report.tensors == 5 and report.shards == 2 and not report.has_provenance
    with pytest.raises(DataError, match="no bema_offline.json"):
        verify(run_dir / "checkpoint-1", recompute=1)


# --- the light check: files agree with each other --------------------------------------------------------------


def test_both_single_file_and_index(made):
    _, _, output = made
    save_file({"x": torch.zeros(1)}, output / "model.safetensors")
    with pytest.raises(DataError, match="both model.safetensors and model.safetensors.index.json"):
        verify(output)


def test_stray_shard(made):
    _, _, output = made
    save_file({"x": torch.zeros(1)}, output / "model-00009-of-00009.safetensors")
    with pytest.raises(DataError, match="model-00009-of-00009.safetensors: a safetensors file that the index does not name"):
        verify(output)


def test_index_total_size(made):
    _, _, output = made
    index_path = output / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 4
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match="total_size"):
        verify(output)


def test_index_forgets_a_tensor(made):
    _, _, output = made
    index_path = output / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][NORM]
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=f"{NORM}.*not in the index"):
        verify(output)


@pytest.mark.parametrize("change, message", [(lambda b: b[:-4], "truncated"), (lambda b: b + b"\0" * 8, "header describes")])
def test_shard_of_the_wrong_length(made, change, message):
    _, _, output = made
    path = shard_of(output, UP)
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(DataError, match=message):
        verify(output)


def test_expected_tensors(made):
    _, _, output = made
    tensors = check_folder(output)
    expected = {name: (info.dtype, info.shape) for name, info in tensors.items()}
    assert check_folder(output, expected=expected) == tensors
    with pytest.raises(DataError, match="'ghost' is missing"):
        check_folder(output, expected={**expected, "ghost": ("F32", (1,))})
    with pytest.raises(DataError, match=f"{NORM}' is F32 \\[8\\], expected BF16 \\[8\\]"):
        check_folder(output, expected={**expected, NORM: ("BF16", (8,))})
    with pytest.raises(DataError, match=f"{NORM}' was not planned"):
        check_folder(output, expected={k: v for k, v in expected.items() if k != NORM})


def test_average_runs_the_light_check_and_publishes_nothing_incomplete(tmp_path, monkeypatch):
    """A slice that never reaches its shard (an engine bug) is caught before publishing."""
    from bema_offline.output import writer

    run_dir, base_dir, _ = make_run(tmp_path, [2, 4])
    original = writer.FolderSink.write

    def drop_one(self, output_index, piece, data):
        if piece.name != NORM:
            original(self, output_index, piece, data)

    monkeypatch.setattr(writer.FolderSink, "write", drop_one)
    with pytest.raises(DataError, match="bytes were never written"):
        average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), base_model=base_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "run"]


# --- config.json ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "update, message",
    [
        ({"vocab_size": 51}, "50 rows but .* vocab_size 51"),
        ({"hidden_size": 16}, "8 columns but .* hidden size 16"),
        ({"num_hidden_layers": 2}, "says 2 layers but layers \\[1\\] have no tensors"),
    ],
)
def test_config_disagrees_with_the_weights(made, update, message):
    _, _, output = made
    config = json.loads((output / "config.json").read_text())
    (output / "config.json").write_text(json.dumps({**config, **update}))
    with pytest.raises(DataError, match=message):
        verify(output)


def test_configs_whose_embeddings_are_not_vocab_by_hidden_are_not_compared(made):
    _, _, output = made
    config = json.loads((output / "config.json").read_text())
    (output / "config.json").write_text(json.dumps({**config, "vocab_size": 49, "embedding_size": 50}))  # OLMo's padding
    verify(output)
    (output / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 0, "num_nextn_predict_layers": 1}))
    verify(output)  # layer 0 is a multi-token-prediction layer


def test_config_that_agrees_and_one_that_is_malformed(made):
    _, _, output = made
    config = json.loads((output / "config.json").read_text())
    (output / "config.json").write_text(json.dumps({**config, "vocab_size": 50, "num_hidden_layers": 1}))
    verify(output)
    (output / "config.json").write_text("{")
    with pytest.raises(DataError, match="config.json: malformed JSON"):
        verify(output)


# --- values -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["1", "0"])  # float32 values: checked by the C kernel, or by torch without it
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_found_in_any_chunk(made, value, kernel, monkeypatch):
    monkeypatch.setenv("BEMA_OFFLINE_KERNEL", kernel)
    _, _, output = made
    path = shard_of(output, UP)
    poke(path, UP, 127, value)  # the last element, in the last chunk of 64 bytes
    with pytest.raises(DataError, match=f"{UP}' holds NaN or Inf"):
        verify(output, max_memory=64)


def write_folder(folder: Path, values: dict[str, torch.Tensor]) -> Path:
    """A model folder written by this tool's writer, tensors in the order given (no alignment padding between them,
    unlike the safetensors library, which sorts them by dtype)."""
    specs = [TensorSpec(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in values.items()]
    with OpenFiles(writable=True, max_open=None) as files:
        folder_writer = ModelFolderWriter(folder, specs, max_shard_size=2**30, files=files)
        for name, tensor in values.items():
            folder_writer.write(name, 0, writable_view(tensor.contiguous().flatten()))
    folder_writer.finish()
    return folder / "model.safetensors"


@pytest.mark.parametrize("max_memory", [8, 24, 64, 4096, 2**20])
def test_values_are_read_once_in_file_order_for_the_sha256_and_every_float_is_checked(tmp_path, max_memory):
    """An odd number of bf16 and bool elements puts the float32 tensors after them at odd offsets: each is read where
    it can be viewed as an array, however the reads are cut, and a NaN anywhere is found."""
    values = {
        "odd_bf16": torch.randn(3).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "w": torch.randn(5, 7),
        "ids": torch.arange(3),
        "v": torch.randn(31),
    }
    path = write_folder(tmp_path / "m", values)
    with safe_open(path, "pt") as f:  # the safetensors library reads what was written
        assert all(torch.equal(f.get_tensor(name), tensor) for name, tensor in values.items())
    tensors = check_folder(tmp_path / "m")
    assert tensors["w"].start % 4 != 0  # misaligned in the file
    assert check_values(tensors, max_memory=max_memory) == {"model.safetensors": hashlib.sha256(path.read_bytes()).hexdigest()}
    for name, element in [("w", 34), ("v", 0), ("v", 30), ("odd_bf16", 2)]:
        broken = dict(values, **{name: values[name].clone().flatten()})
        broken[name][element] = float("nan")
        broken[name] = broken[name].reshape(values[name].shape)
        shutil.rmtree(tmp_path / "m")
        write_folder(tmp_path / "m", broken)
        with pytest.raises(DataError, match=f"tensor '{name}' holds NaN or Inf"):
            check_values(check_folder(tmp_path / "m"), max_memory=max_memory)


def test_every_check_is_linear_in_tensors_and_shards(tmp_path, monkeypatch):
    """The light check and the provenance check, on 150 and 300 tensors with one shard each: the work they do per
    tensor (counted as reads of `TensorInfo.path`) does not grow with the number of shards. They were quadratic:
    20,000 tensors in 20,000 shards took 97 s to average and 129 s to verify."""
    counts = []
    for n in (150, 300):
        shapes = {f"model.layers.{i}.mlp.experts.0.up_proj.weight": (2, 2) for i in range(n)}
        run_dir, base_dir, _ = make_run(tmp_path / str(n), [2], shapes=shapes)
        output = tmp_path / str(n) / "out"
        average(run_dir, output, schedule=BEMASchedule(update_freq=2), base_model=base_dir, max_shard_size="16B")
        tensors = check_folder(output)
        assert len({info.path for info in tensors.values()}) == n
        reads = []
        original = TensorInfo.path
        monkeypatch.setattr(TensorInfo, "path", property(lambda info: reads.append(1) or original.fget(info)))
        check_folder(output)
        record = read_provenance(output)
        check_provenance(output, record, tensors, check_values(tensors))
        monkeypatch.undo()
        counts.append(len(reads))
    assert counts[1] <= 2.2 * counts[0], counts


# --- bema_offline.json --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(tensors=5), "records 5 tensors but the folder holds 6"),
        (lambda r: r["effective_weights"][1].update(weight=0.5), "effective weights do not follow"),
        (lambda r: r["schedule"].update(ema_power=0.3), "effective weights do not follow"),
        (lambda r: r["output_files"][0].update(size=1), "weight files it records differ"),
        (lambda r: r["output_files"][1].update(sha256="0" * 64), "model-00002-of-00004.safetensors: its sha256 differs"),
        (lambda r: r["output_files"][-1].update(sha256="0" * 64), "model.safetensors.index.json: its sha256 differs"),
        (lambda r: r["output_files"][2].pop("sha256"), "model-00003-of-00004.safetensors: its sha256 differs"),
        (lambda r: r.update(output_files={"a": 1}), "malformed output_files"),
        (lambda r: r["settings"].update(dtype="bfloat16"), "F32 but bema_offline.json says --dtype bfloat16"),
        (lambda r: r["settings"].update(max_shard_size=100), "more than the recorded max_shard_size"),
        (lambda r: r.pop("inputs"), "lacks fields"),
        (lambda r: r.update(tool="other"), "not a bema-offline provenance"),
        (lambda r: r["schedule"].update(update_freq=0), "malformed provenance record"),
        (lambda r: r["steps"].update(update_steps_used=[2, 4]), "not the last of the update steps"),
    ],
)
def test_provenance_that_does_not_match_the_folder(made, change, message):
    _, _, output = made
    edit_record(output, change)
    with pytest.raises(DataError, match=message):
        verify(output)


# --- the sources ------------------------------------------------------------------------------------------------


def test_sources_gone_are_a_note_but_recompute_needs_them(made):
    run_dir, _, output = made
    (run_dir / "checkpoint-4").rename(run_dir / "moved")
    (report,) = verify(output)
    assert report.sources_checked == [0, 2, 6] and "1 source folders are gone" in report.notes[0]
    with pytest.raises(DataError, match="cannot recompute"):
        verify(output, recompute=1)


def test_source_with_another_shape(made):
    run_dir, _, output = made
    folder = run_dir / "checkpoint-4"
    tensors = load_file(folder / "model.safetensors")
    tensors[NORM] = torch.zeros(9)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(DataError, match=f"{NORM}' is \\[8\\] but \\[9\\] in step 4"):
        verify(output)


# --- recompute ----------------------------------------------------------------------------------------------------


def flip_bit(output: Path, name: str, element: int) -> Path:
    """Flip the lowest mantissa bit of one float32 element in place (still finite); returns the shard."""
    path = shard_of(output, name)
    data = bytearray(path.read_bytes())
    data[check_folder(output)[name].start + 4 * element] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def test_recompute_catches_one_wrong_bit_where_no_sha256_is_recorded(made):
    _, _, output = made
    verify(output, recompute=100, seed=1)  # healthy before
    edit_record(output, lambda r: [entry.pop("sha256") for entry in r["output_files"]])  # as older versions wrote it
    flip_bit(output, UP, 37)
    (report,) = verify(output)  # the structural and value checks cannot see it
    assert any("records no sha256" in note for note in report.notes)
    with pytest.raises(DataError, match=f"{UP}' differs from its recomputation at element 37"):
        verify(output, recompute=100)


def test_plain_verify_catches_one_wrong_bit_by_its_sha256(made):
    _, _, output = made
    path = flip_bit(output, UP, 37)
    with pytest.raises(DataError, match=f"{path}: its sha256 differs from the one recorded in bema_offline.json"):
        verify(output)


def test_plain_verify_catches_a_header_edit_that_every_structural_check_accepts(made):
    _, _, output = made
    path = shard_of(output, NORM)
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    padding = data.rindex(b"}", 0, header_end) + 1
    assert padding < header_end  # the header is padded with spaces to 8 bytes; a tab is JSON whitespace too
    data[padding] = ord("\t")
    path.write_bytes(bytes(data))
    check_folder(output)  # the header still parses and describes the same tensors
    with pytest.raises(DataError, match=f"{path.name}: its sha256 differs"):
        verify(output)


def test_an_output_of_an_older_version_without_file_records_gets_a_note(made):
    _, _, output = made
    edit_record(output, lambda r: r.pop("output_files"))
    (report,) = verify(output)
    assert report.notes == [f"{output / 'bema_offline.json'}: records no sha256 of the weight files (an output of an older "
                            "bema-offline), so their bytes were not checked against it"]


def test_recompute_notices_a_changed_source(made):
    run_dir, _, output = made
    folder = run_dir / "checkpoint-6"
    tensors = load_file(folder / "model.safetensors")
    tensors[UP][0, 0] += 1
    save_file(tensors, folder / "model.safetensors")
    (report,) = verify(output)
    assert any("source files changed" in note for note in report.notes)
    with pytest.raises(DataError, match=f"{UP}' differs from its recomputation at element 0; the output is wrong or its sources changed"):
        verify(output, recompute=100)


# --- real Hugging Face folders: the config checks know their field and tensor names ----------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_real_qwen2_folders_pass(tmp_path, tied):
    from tiny_hf import make_tiny_qwen2, make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "m")
    make_tiny_qwen2(tmp_path / "m", tokenizer, tie_word_embeddings=tied, dtype=torch.bfloat16)
    (report,) = verify(tmp_path / "m")
    assert report.notes == [] and report.tensors == (26 if tied else 27)  # lm_head.weight only when untied
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(DataError, match="says 3 layers but layers \\[2\\] have no tensors"):
        verify(tmp_path / "m")


def test_real_gpt2_folder_passes(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=40, n_positions=16)).save_pretrained(tmp_path / "g")
    (report,) = verify(tmp_path / "g")
    assert report.notes == []
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps({**config, "vocab_size": 41}))
    with pytest.raises(DataError, match="'transformer.wte.weight' has 40 rows but .* vocab_size 41"):
        verify(tmp_path / "g")
