"""Fuzz everything that parses untrusted bytes: safetensors headers, shard indexes, checkpoint folder names, and sweep
files (YAML and JSON).

The only acceptable outcomes are a result that honours the parser's promises, or a `DataError`. Any other
exception fails. CI runs a fixed number of derandomized examples per test; a longer run by hand:

    BEMA_FUZZ_EXAMPLES=100000 python -m pytest tests/test_fuzz_parsers.py -q --hypothesis-show-statistics
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from bema_offline.sources.run import find_checkpoints, load_source
from bema_offline.dtypes import DTYPES
from bema_offline.errors import DataError, UsageError
from bema_offline.methods.sweep import FIELDS, check_names, sweep_configs
from bema_offline.sources.safetensors_io import read_header

EXAMPLES = int(os.environ.get("BEMA_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

VALID = save(
    {
        "model.embed_tokens.weight": torch.randn(6, 4),
        "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "position_ids": torch.arange(3),
        "empty": torch.zeros(0, 5),
        "mask": torch.tensor([True, False]),
    },
    metadata={"format": "pt"},
)
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]

_workdir = Path(tempfile.mkdtemp(prefix="bema-fuzz-"))


def teardown_module() -> None:
    shutil.rmtree(_workdir, ignore_errors=True)


def check_header(data: bytes) -> None:
    """`read_header` on these bytes either fails with a DataError or returns tensors that fit the file."""
    path = _workdir / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        tensors, metadata = read_header(path)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    end = header_end
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        assert info.dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in info.shape)
        assert info.nbytes == info.numel * info.itemsize
        assert info.start >= end and info.start + info.nbytes <= len(data)  # in the file, no overlap
        end = info.start + info.nbytes
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


# --- safetensors headers -----------------------------------------------------------------------------------------

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, HEADER_END + 8), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, HEADER_END + 8), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, HEADER_END), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, HEADER_END), st.integers(1, 16)),
)


def mutate(data: bytes, mutations) -> bytes:
    buffer = bytearray(data)
    for kind, position, value in mutations:
        position = min(position, len(buffer))
        if kind == "flip" and position < len(buffer):
            buffer[position] ^= value
        elif kind == "set" and position < len(buffer):
            buffer[position] = value
        elif kind == "truncate":
            del buffer[position:]
        elif kind == "insert":
            buffer[position:position] = bytes([value])
        elif kind == "delete":
            del buffer[position : position + value]
    return bytes(buffer)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6))
def test_mutated_valid_files(mutations):
    check_header(mutate(VALID, mutations))


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
dims = st.one_of(st.integers(0, 8), st.integers(-3, 2**66), st.booleans(), st.floats(0, 8), st.text(max_size=2))
entries = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), json_values),
            "shape": st.one_of(st.lists(dims, max_size=3), json_values),
            "data_offsets": st.one_of(st.lists(st.integers(-4, 200), min_size=0, max_size=3), json_values),
        }
    ),
    json_values,
)
headers = st.dictionaries(st.one_of(st.text(max_size=6), st.just("__metadata__")), entries, max_size=5)


@FUZZ
@given(headers, st.binary(max_size=256), st.integers(-8, 8))
def test_random_json_headers(header, data, length_error):
    raw = json.dumps(header).encode()
    length = len(raw) + length_error
    assume(length >= 0)
    check_header(struct.pack("<Q", length) + raw + data)


@FUZZ
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_random_bytes_after_a_plausible_length(raw, data):
    check_header(struct.pack("<Q", len(raw)) + raw + data)


# --- shard indexes -----------------------------------------------------------------------------------------------

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
TENSORS = {"a": torch.zeros(3), "b": torch.ones(2, 2), "c": torch.arange(4)}
shard_names = st.one_of(
    st.sampled_from(SHARDS),
    st.sampled_from(["", ".", "..", "../model-00001-of-00002.safetensors", "missing.safetensors", "a" * 300, "x\x00y", "\ud800", "/etc/passwd"]),
    st.text(max_size=12),
)
weight_maps = st.dictionaries(st.sampled_from(["a", "b", "c", "d", ""]), shard_names, max_size=5)
indexes = st.one_of(
    st.fixed_dictionaries({"metadata": json_values, "weight_map": st.one_of(weight_maps, json_values)}),
    json_values,
)


@FUZZ
@given(indexes, st.booleans())
def test_random_indexes(index, surrogate_escape):
    folder = _workdir / "sharded"
    if not folder.exists():
        folder.mkdir()
        save_file({"a": TENSORS["a"], "c": TENSORS["c"]}, folder / SHARDS[0])
        save_file({"b": TENSORS["b"]}, folder / SHARDS[1])
    text = json.dumps(index, ensure_ascii=surrogate_escape)
    (folder / "model.safetensors.index.json").write_bytes(text.encode("utf-8", errors="surrogatepass"))
    try:
        source = load_source(folder, 1)
    except DataError as e:
        assert "\n" not in str(e)
        return
    weight_map = index["weight_map"]  # a valid index may name fewer tensors than the shards beside it hold
    assert set(source.tensors) == set(weight_map) and set(source.tensors) <= set(TENSORS)
    assert all(info.path == folder / weight_map[name] for name, info in source.tensors.items())


# --- checkpoint folder names -------------------------------------------------------------------------------------

names = st.one_of(
    st.builds(lambda s: f"checkpoint-{s}", st.text(max_size=6)),
    st.builds(lambda n, z: f"checkpoint-{'0' * z}{n}", st.integers(0, 10**6), st.integers(0, 2)),
    st.text(min_size=1, max_size=12),
)


@FUZZ
@given(st.lists(names, max_size=5, unique=True))
def test_random_folder_names(folder_names):
    run_dir = _workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    made = []
    for name in folder_names:
        try:
            (run_dir / name).mkdir()
            made.append(name)
        except (OSError, ValueError):  # names the file system refuses ("/", NUL, too long) cannot occur in a listing
            pass
    try:
        found = find_checkpoints(run_dir)
    except DataError as e:
        assert "\n" not in str(e)
        return
    for step, path in found.items():
        assert path.name in made and path.name.startswith("checkpoint-")
        assert path.name[len("checkpoint-") :].isascii() and int(path.name[len("checkpoint-") :]) == step


# --- sweep files -------------------------------------------------------------------------------------------------

sweep_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8),
    st.sampled_from(["bema", "uniform", "power-ema", "wsm", "expo", "ema", "cosine", "100:200", ":5", "yes", "0.1", "4"]),
)
sweep_keys = st.one_of(st.sampled_from([*FIELDS, "name", "sigma-rel"]), st.text(max_size=6))
sweep_entries = st.one_of(st.dictionaries(sweep_keys, sweep_scalars, max_size=5), json_values)
sweep_documents = st.one_of(
    st.lists(sweep_entries, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["a\x00b", "model.safetensors", "x" * 300, "\ud800"])), sweep_entries, max_size=3),
    json_values,
)
yaml_texts = st.one_of(  # YAML's own syntax: anchors, aliases, merge keys, tags, flow and block styles
    st.text(max_size=60),
    st.builds(
        lambda anchor, body, uses: f"a: &{anchor} {body}\n" + "".join(f"k{i}: *{anchor}\n" for i in range(uses)),
        st.sampled_from(["x", "lol", "a1"]), st.sampled_from(["[1, 2]", "{lag: 3}", "yes", "~"]), st.integers(0, 3),
    ),
    st.builds(lambda tag, value: f"- {{lag: {tag} {value}}}\n", st.sampled_from(["!!float", "!!str", "!!python/object", "!!binary", "!foo"]), st.sampled_from(["3", "x", "AAAA"])),
)


def check_sweep(path: Path) -> None:
    """`sweep_configs` on this file either fails with a one-line Usage/DataError, or returns named methods whose
    names are plain, distinct folder names."""
    try:
        configs = sweep_configs(path)
    except (UsageError, DataError) as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
        return
    assert configs and check_names(configs, source="fuzz") == configs
    for name, method in configs:
        assert isinstance(name, str) and method.to_dict()["method"] == method.name


@FUZZ
@given(sweep_documents, st.sampled_from([".yaml", ".json"]))
def test_random_sweep_files(document, suffix):
    import yaml

    path = _workdir / f"sweep{suffix}"
    text = json.dumps(document) if suffix == ".json" else yaml.safe_dump(document, allow_unicode=True)
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    check_sweep(path)


@FUZZ
@given(yaml_texts)
def test_random_yaml_text(text):
    path = _workdir / "sweep.yml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    check_sweep(path)
