"""The `.bin` reader: every tensor as `torch.load(weights_only=True)` gives it, bit for bit, without running the pickle."""

import io
import os
import pickle
import zipfile

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import malicious_bin, read_tensor, recompressed, same_bits, tiny_model, torch_save_bytes, with_pickle

from bema_offline.errors import DataError
from bema_offline.sources.run import load_source
from bema_offline.sources.torch_bin import MAX_RUNS, load_torch_bin, unpickle, view_runs


def odd_tensors() -> dict[str, torch.Tensor]:
    """Tensors of every kind a state dict may hold: views, scalars, empty ones, and dtypes without a legacy storage."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    return {
        "rows": base[2:5],  # a contiguous view at an offset
        "columns": base[:, 3:7],  # one run per row
        "transposed": base.T,  # one run per element
        "expanded": torch.arange(4.0).expand(3, 4),  # stride 0: the same bytes three times
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 5),
        "half": torch.randn(3, 2).half(),
        "double": torch.randn(2, 2, dtype=torch.float64),
        "int64": torch.arange(5),
        "int8": torch.tensor([-3, 4], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "float8": torch.randn(4, 3).to(torch.float8_e4m3fn),  # pickled with _rebuild_tensor_v3
        "uint16": torch.tensor([1, 65535], dtype=torch.int32).to(torch.uint16),
    }


@pytest.fixture(scope="module")
def model_state():
    model = tiny_model(tied=True)
    return model, model.state_dict()


def assert_matches_torch_load(folder, files, *, left_out=()):
    source = load_source(folder, 7)
    expected = {}
    for path in files:
        expected.update(torch.load(path, weights_only=True))
    assert sorted(source.tensors) == sorted(n for n in expected if n not in left_out)
    for name, info in source.tensors.items():
        assert same_bits(read_tensor(info), expected[name].contiguous()), name
    assert source.layout == "pytorch .bin" and sorted(source.identities) == sorted(files)
    return source


def test_single_file_matches_torch_load(tmp_path, model_state):
    _, state = model_state
    torch.save({**state, **odd_tensors()}, tmp_path / "pytorch_model.bin")
    source = assert_matches_torch_load(tmp_path, [tmp_path / "pytorch_model.bin"], left_out=["lm_head.weight"])
    # the tied lm_head shares the embeddings' storage: left out, as save_pretrained leaves it out
    assert "lm_head.weight (= model.embed_tokens.weight)" in source.notes[0]
    assert len(source.tensors["model.layers.0.mlp.up_proj.weight"].extents) == 1
    assert len(source.tensors["columns"].extents) == 6 and len(source.tensors["transposed"].extents) == 48
    assert source.tensors["float8"].dtype == "F8_E4M3" and source.tensors["uint16"].dtype == "U16"


def test_parameters_pickle_through_rebuild_parameter(tmp_path):
    model = tiny_model(tied=False)
    parameters = dict(model.named_parameters())  # nn.Parameter objects, as torch.save(model_parameters) writes them
    torch.save(parameters, tmp_path / "pytorch_model.bin")
    assert b"_rebuild_parameter" in (tmp_path / "pytorch_model.bin").read_bytes()
    assert_matches_torch_load(tmp_path, [tmp_path / "pytorch_model.bin"])


def test_shards_written_by_huggingface_hub(tmp_path, model_state):
    _, state = model_state
    untied = {name: t.clone() for name, t in state.items()}
    save_torch_state_dict(untied, tmp_path, safe_serialization=False, max_shard_size=3000)
    shards = sorted(tmp_path.glob("pytorch_model-*-of-*.bin"))
    assert len(shards) > 2 and (tmp_path / "pytorch_model.bin.index.json").is_file()
    source = assert_matches_torch_load(tmp_path, shards)
    assert not source.notes


@pytest.mark.parametrize(
    "shape, stride, runs",
    [
        ((3, 4), (4, 1), [(0, 0, 12)]),
        ((3, 4), (8, 1), [(0, 0, 4), (4, 8, 4), (8, 16, 4)]),
        ((2, 1, 3), (3, 99, 1), [(0, 0, 6)]),  # a dimension of size 1 has any stride
        ((), (), [(0, 0, 1)]),
        ((2, 2), (1, 2), [(0, 0, 1), (1, 2, 1), (2, 1, 1), (3, 3, 1)]),
    ],
)
def test_view_runs(shape, stride, runs):
    assert view_runs(shape, stride) == runs


def test_scattered_views_are_refused_clearly(tmp_path):
    torch.save({"w": torch.zeros(80, 80).T}, tmp_path / "pytorch_model.bin")  # 6400 one-element runs
    with pytest.raises(DataError, match=r"tensor 'w' is a non-contiguous view .* tensor\.contiguous\(\)"):
        load_torch_bin(tmp_path, 1)
    assert view_runs((80, 80), (1, 80)) is None and MAX_RUNS < 6400


def test_a_pickle_that_would_run_a_command_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "pytorch_model.bin").write_bytes(malicious_bin(marker))
    with pytest.raises(DataError, match=r"pytorch_model.bin: the pickle needs (posix|os).system, which is neither a tensor"):
        load_torch_bin(tmp_path, 1)
    assert not marker.exists()
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)  # the payload is live: torch's full unpickler runs it
    assert marker.exists()


def test_opaque_mode_keeps_other_objects_inert(tmp_path):
    marker = tmp_path / "pwned"
    data = zipfile.ZipFile(io.BytesIO(malicious_bin(marker))).read("archive/data.pkl")
    root, storages = unpickle(data, "x", opaque=True)
    assert type(root["payload"]).qualname in ("posix.system", "os.system") and root["payload"].args == (f"touch {marker}",)
    assert list(storages) == ["0"] and not marker.exists()


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda data: data[: len(data) // 2], "not a torch.save zip archive"),
        (lambda data: data[:10], "only 10 bytes"),
        (lambda data: data.replace(b"PK\x01\x02", b"PK\x01\x03", 1), "malformed zip central directory"),
        (lambda data: with_pickle(data, b"\x80\x02\xff"), r"malformed pickle \(at position 2, opcode b'.xff' unknown\)"),
        # a memo index that would make CPython's unpickler clear 32 GiB
        (lambda data: with_pickle(data, b"\x80\x02}r\xff\xff\xff\x7f."), "memo index 2147483647 in a pickle of 9 bytes"),
        (lambda data: with_pickle(data, pickle.dumps([1, 2], protocol=2)), "holds an object of type list, not a state dict"),
        (lambda data: with_pickle(data, pickle.dumps({"a": 1}, protocol=2)), "tensor 'a' is an object of type int, not a tensor"),
        (recompressed, "is compressed"),
    ],
)
def test_broken_archives_get_one_line(tmp_path, break_it, message):
    data = torch_save_bytes({"model.norm.weight": torch.ones(300), "model.embed_tokens.weight": torch.zeros(4, 5)})
    (tmp_path / "pytorch_model.bin").write_bytes(break_it(data))
    with pytest.raises(DataError, match=message) as caught:
        load_source(tmp_path, 1)
    assert "\n" not in str(caught.value) and str(tmp_path / "pytorch_model.bin") in str(caught.value)


def test_storage_truncated_inside_the_data(tmp_path):
    data = torch_save_bytes({"w": torch.ones(1000)})
    # keep the central directory, cut the bytes of the storage: its zip entry no longer fits before the directory
    entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    storage = next(e for e in entries if e.filename.endswith("/data/0"))
    directory = data.rindex(b"PK\x01\x02", 0, data.rindex(b"PK\x05\x06"))
    cut = data[: storage.header_offset + 200] + data[storage.header_offset + 3000 : directory] + data[directory:]
    (tmp_path / "pytorch_model.bin").write_bytes(cut)
    with pytest.raises(DataError, match="pytorch_model.bin"):
        load_torch_bin(tmp_path, 1)


def test_index_errors(tmp_path, model_state):
    _, state = model_state
    save_torch_state_dict({n: t.clone() for n, t in state.items()}, tmp_path, safe_serialization=False, max_shard_size=3000)
    shard = sorted(tmp_path.glob("pytorch_model-*.bin"))[1]
    shard.rename(tmp_path / "moved.bin")
    with pytest.raises(DataError, match=f"names shard '{shard.name}', which is missing"):
        load_source(tmp_path, 1)


def test_non_weights_files_are_never_read(tmp_path):
    torch.save({"lr": 0.1}, tmp_path / "optimizer.pt")
    torch.save({"x": torch.ones(2)}, tmp_path / "rng_state.pth")
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(DataError, match=r"no model.safetensors, pytorch_model.bin, pytorch_model_fsdp_0/ or DeepSpeed global_step\*/, .* it holds optimizer.pt, rng_state.pth, training_args.bin \(only training state"):
        load_source(tmp_path, 1)


FUZZ = settings(max_examples=int(os.environ.get("BEMA_FUZZ_EXAMPLES", "100")), derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
VALID = torch_save_bytes({"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.ones(2, dtype=torch.bfloat16)[1:]})


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8), st.integers(0, len(VALID)))
def test_fuzz_damaged_archives_give_data_errors(tmp_path_factory, flips, length):
    """Bytes flipped anywhere, then cut anywhere: a source whose tensors lie inside the file, or a DataError."""
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "pytorch_model.bin").write_bytes(bytes(data[:length]))
    try:
        source = load_torch_bin(folder, 1)
    except DataError as e:
        assert "\n" not in str(e)
        return
    size = (folder / "pytorch_model.bin").stat().st_size
    for info in source.tensors.values():
        assert all(offset + nbytes <= size for _, offset, nbytes in info.ranges(0, info.numel))


def test_a_pickle_cannot_change_what_the_next_pickle_gets(tmp_path):
    """BUILD sets attributes on whatever a pickle was given: a storage class's marker, a rebuild function. Each
    pickle gets its own copies, so one hostile file cannot make every later FloatStorage read as int32."""
    retag = b"\\x80\\x02ctorch\\nFloatStorage\\n}X\\x05\\x00\\x00\\x00valueX\\x03\\x00\\x00\\x00I32sb."
    defaults = b"\\x80\\x02ctorch._utils\\n_rebuild_tensor_v2\\n}X\\x0c\\x00\\x00\\x00__defaults__(\\x88NX\\x03\\x00\\x00\\x00negtsb."
    for hostile in (retag, defaults):
        try:
            unpickle(hostile.decode("unicode_escape").encode("latin-1"), "hostile.bin")
        except DataError:
            pass
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    source = load_source(tmp_path, 1)
    assert source.tensors["w"].dtype == "F32" and same_bits(read_tensor(source.tensors["w"]), state["w"])


def test_a_pickle_that_expands_exponentially_gets_one_line_at_once():
    """A tuple doubled through the memo 40 times is a few bytes, and 2**40 items when printed in full."""
    data = bytearray(b"\\x80\\x04N")
    for level in range(40):
        data += b"\\x94h" + bytes([level]) + b"\\x86"  # MEMOIZE, BINGET level, TUPLE2: (x, x)
    data += b"Q."  # BINPERSID: the tuple as a storage id
    with pytest.raises(DataError, match=r"hostile.bin: malformed pickle \(an unexpected persistent id \(\(\(\(.{0,200}\); the file is corrupt"):
        unpickle(bytes(data).decode("unicode_escape").encode("latin-1"), "hostile.bin")


def test_an_opaque_pickle_naming_thousands_of_classes_is_refused():
    names = b"".join(b"cmod\\nC%d\\n0" % i for i in range(1001))  # GLOBAL, POP
    with pytest.raises(DataError, match="names more than 1000 classes"):
        unpickle((b"\\x80\\x02" + names + b"N.").decode("unicode_escape").encode("latin-1"), "optimizer.pt", opaque=True)
