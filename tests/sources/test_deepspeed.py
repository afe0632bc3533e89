"""The DeepSpeed ZeRO reader: every parameter as DeepSpeed's own `zero_to_fp32` rebuilds it, bit for bit, on
checkpoints written by DeepSpeed on 2 CPU ranks (ZeRO-1, 2 and 3, padded partitions, a frozen and a tied parameter)."""

import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import read_tensor, same_bits, with_pickle

from bema_offline.errors import DataError
from bema_offline.sources.deepspeed import convert_command, load_deepspeed
from bema_offline.sources.run import load_source

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")


def zero_to_fp32(folder):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder))


def model_states(folder):
    """The model-states file of rank 0, loaded by torch (DeepSpeed's classes importable here)."""
    tag = (folder / "latest").read_text().strip()
    path = next((folder / tag).glob("*mp_rank_00_model_states.pt"))
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("step", [2, 4])
def test_parameters_match_zero_to_fp32(sharded_runs, stage, step):
    folder = sharded_runs / f"zero{stage}" / "run" / f"checkpoint-{step}"
    source = load_source(folder, step)
    expected = zero_to_fp32(folder)
    states = model_states(folder)
    tied = set(states["shared_params"])  # zero_to_fp32 repeats a tied parameter under its alias; stored once here
    unrecorded = {"model.norm.weight"} if stage == 1 else set()  # ZeRO-1 keeps no record of frozen parameters
    assert set(source.tensors) == set(expected) - tied | unrecorded
    for name, info in source.tensors.items():
        reference = states["module"][name] if name in unrecorded else expected[name]
        assert same_bits(read_tensor(info), reference.contiguous()), name
    assert source.layout == f"deepspeed zero-{stage} fp32 master weights"
    assert source.tensors["model.embed_tokens.weight"].dtype == "F32"
    assert source.tensors["model.norm.weight"].dtype == "BF16"  # frozen: it never had fp32 master weights
    assert f"fp32 master weights of DeepSpeed ZeRO-{stage} (global_step{step}, 2 partitions), more precise than the BF16" in source.notes[0]
    if stage == 2:
        assert any("lm_head.weight (= model.embed_tokens.weight)" in note for note in source.notes)
    # ZeRO-3 splits every parameter over both ranks (67 x 33 elements: the second half padded by one); ZeRO-1/2 split
    # the flat group, so one parameter straddles the two partitions
    spans = {name: len(info.paths) for name, info in source.tensors.items()}
    assert spans["model.embed_tokens.weight"] == (2 if stage == 3 else 1) and max(spans.values()) == 2


@pytest.fixture
def checkpoint(sharded_runs, tmp_path):
    """A copy of a ZeRO-3 checkpoint to break."""
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(sharded_runs / "zero3" / "run" / "checkpoint-4", folder)
    return folder


def test_missing_partition(checkpoint):
    (checkpoint / "global_step4" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DataError, match=r"global_step4: ZeRO partitions for 2 ranks are expected but 1 were found; the checkpoint is incomplete"):
        load_source(checkpoint, 4)
    (checkpoint / "global_step4" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(
        checkpoint / "global_step4" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(DataError, match=r"the optimizer partition of rank 0 .* is missing"):
        load_source(checkpoint, 4)


def test_missing_model_states(checkpoint):
    (checkpoint / "global_step4" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(DataError, match=r"zero_pp_rank_1_mp_rank_00_model_states.pt is missing; the checkpoint is incomplete"):
        load_source(checkpoint, 4)


def test_latest_names_a_missing_folder(checkpoint):
    (checkpoint / "latest").write_text("global_step9")
    with pytest.raises(DataError, match=r"latest: names global_step9, which is missing"):
        load_source(checkpoint, 4)


def test_a_variant_that_cannot_stream_gets_the_exact_conversion_command(checkpoint):
    """A pipeline-parallel file is refused with DeepSpeed's own command; run as printed, it makes the checkpoint one
    this tool reads (safetensors), with the very values streamed from the partitions."""
    streamed = {name: read_tensor(info) for name, info in load_deepspeed(checkpoint, 4).tensors.items()}
    layer_file = checkpoint / "global_step4" / "layer_01-model_states.pt"
    layer_file.write_bytes(b"")
    with pytest.raises(DataError, match=r"pipeline-parallel checkpoint\); convert it with DeepSpeed's own script: python .*zero_to_fp32.py") as caught:
        load_source(checkpoint, 4)
    command = str(caught.value).split("own script: ", 1)[1]
    assert command == convert_command(checkpoint)
    layer_file.unlink()
    subprocess.run([sys.executable if part == "python" else part for part in shlex.split(command)], check=True, capture_output=True, timeout=300)
    converted = load_source(checkpoint, 4)
    assert converted.layout == "safetensors" and set(converted.tensors) == set(streamed)
    for name, info in converted.tensors.items():  # the script writes frozen parameters as fp32 too (exactly)
        assert same_bits(read_tensor(info), streamed[name].float()), name


def test_checkpoint_without_optimizer_partitions(checkpoint):
    for path in (checkpoint / "global_step4").glob("*optim_states.pt"):
        path.unlink()
    with pytest.raises(DataError, match=r"no \*_optim_states.pt ZeRO partitions, so no fp32 master weights"):
        load_source(checkpoint, 4)


FUZZ = settings(max_examples=int(os.environ.get("BEMA_FUZZ_EXAMPLES", "100")), derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(which=st.sampled_from(["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_damaged_pickles_give_data_errors(sharded_runs, tmp_path_factory, which, flips):
    """Bytes of a partition's or the model states' pickle flipped: a source whose tensors lie inside their files,
    or one line; DeepSpeed's objects stay inert either way."""
    folder = tmp_path_factory.mktemp("fuzz") / "checkpoint-2"
    shutil.copytree(sharded_runs / "zero3" / "run" / "checkpoint-2", folder)
    path = folder / "global_step2" / which
    archive = path.read_bytes()
    pickled = bytearray(zipfile.ZipFile(io.BytesIO(archive)).read(f"{path.stem}/data.pkl"))
    for position, value in flips:
        pickled[position % len(pickled)] = value
    path.write_bytes(with_pickle(archive, bytes(pickled)))
    try:
        source = load_source(folder, 2)
    except DataError as e:
        assert "\n" not in str(e)
        return
    for info in source.tensors.values():
        assert all(offset + n <= p.stat().st_size for p, offset, n in info.ranges(0, info.numel))
