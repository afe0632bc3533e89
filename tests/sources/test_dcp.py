"""The FSDP sharded-checkpoint reader: every tensor as DCP's own loader gives it, bit for bit, under the model's names."""

import os
import pickle
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import RunsCommand, read_tensor, same_bits, tiny_model
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bema_offline.errors import DataError
from bema_offline.sources.dcp import DCP_FOLDER, load_dcp
from bema_offline.sources.run import load_source


def dcp_load(folder, tmp_path):
    """The tensors of a DCP folder as torch's own loader reads them (no process group, one process)."""
    out = tmp_path / "loaded.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("step", [2, 4])
def test_fsdp_checkpoint_matches_dcp_load(sharded_runs, tmp_path, step):
    folder = sharded_runs / "fsdp" / "run" / f"checkpoint-{step}"
    source = load_source(folder, step)
    expected = dcp_load(folder / DCP_FOLDER, tmp_path)["model"]  # accelerate saves {"model": state_dict}
    # the model's own names, as save_pretrained writes them (the base model was saved so)
    assert set(source.tensors) == set(expected) == set(load_file(sharded_runs / "fsdp" / "base" / "model.safetensors"))
    for name, info in source.tensors.items():
        assert same_bits(read_tensor(info), expected[name]), name
    embed = source.tensors["model.embed_tokens.weight"]  # 67 rows over 2 ranks: 34 and 33
    assert [e.path.name for e in embed.extents] == ["__0_0.distcp", "__1_0.distcp"] and embed.extents[1].first == 34 * 33
    assert source.layout == "fsdp sharded (dcp)" and len(source.identities) == 3  # .metadata and two .distcp files


def test_chunks_cut_along_inner_dimensions(sharded_runs, tmp_path):
    folder = sharded_runs / "columns"
    source = load_dcp(folder, 1)
    expected = dcp_load(folder / DCP_FOLDER, tmp_path)
    assert sorted(source.tensors) == ["cube", "wide"]
    for name, info in source.tensors.items():
        assert same_bits(read_tensor(info), expected[name]), name
    assert len(source.tensors["wide"].extents) == 10  # 5 rows, each cut in 2 columns


def test_one_process_save_of_a_plain_state_dict(tmp_path):
    """`torch.distributed.checkpoint.save` of a tiny model's state dict, one gloo process: keys are the model's."""
    model = tiny_model(tied=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dcp.save(model.state_dict(), checkpoint_id=tmp_path / "ck" / DCP_FOLDER)
    finally:
        dist.destroy_process_group()
    source = load_source(tmp_path / "ck", 3)
    state = model.state_dict()
    assert sorted(source.tensors) == sorted(state)
    for name, info in source.tensors.items():
        assert same_bits(read_tensor(info), state[name]), name
    assert all(len(info.extents) == 1 for info in source.tensors.values())


@pytest.fixture
def checkpoint(sharded_runs, tmp_path):
    """A copy of an FSDP checkpoint to break."""
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(sharded_runs / "fsdp" / "run" / "checkpoint-4", folder)
    return folder


def test_missing_distcp_file(checkpoint):
    (checkpoint / DCP_FOLDER / "__1_0.distcp").unlink()
    with pytest.raises(DataError, match=r"\.metadata: names __1_0\.distcp, which is missing; the checkpoint is incomplete"):
        load_source(checkpoint, 4)


def test_missing_metadata(checkpoint):
    (checkpoint / DCP_FOLDER / ".metadata").unlink()
    with pytest.raises(DataError, match=r"pytorch_model_fsdp_0: no \.metadata .* the FSDP checkpoint is incomplete"):
        load_source(checkpoint, 4)


def test_truncated_distcp_file(checkpoint):
    path = checkpoint / DCP_FOLDER / "__1_0.distcp"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"__1_0\.distcp.*(runs past the end|truncated)"):
        load_source(checkpoint, 4)


def test_chunk_that_is_not_a_torch_archive(checkpoint):
    path = checkpoint / DCP_FOLDER / "__0_0.distcp"
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(DataError, match=r"__0_0\.distcp \(item at byte 0\): .*not a torch.save zip archive"):
        load_source(checkpoint, 4)


def test_metadata_that_would_run_a_command_is_never_run(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    (checkpoint / DCP_FOLDER / ".metadata").write_bytes(pickle.dumps(RunsCommand(f"touch {marker}"), protocol=2))
    with pytest.raises(DataError, match=r"expected DCP's Metadata, found <(posix|os)\.system>"):
        load_source(checkpoint, 4)
    assert not marker.exists()


def test_garbage_metadata(checkpoint):
    (checkpoint / DCP_FOLDER / ".metadata").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(DataError, match=r"\.metadata: malformed pickle"):
        load_source(checkpoint, 4)


FUZZ = settings(max_examples=int(os.environ.get("BEMA_FUZZ_EXAMPLES", "100")), derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_damaged_metadata_gives_data_errors(sharded_runs, tmp_path_factory, flips):
    """Bytes of `.metadata` flipped: the checkpoint reads (and then its tensors lie inside its files), or one line."""
    folder = tmp_path_factory.mktemp("fuzz") / "checkpoint-2"
    shutil.copytree(sharded_runs / "fsdp" / "run" / "checkpoint-2", folder)
    path = folder / DCP_FOLDER / ".metadata"
    data = bytearray(path.read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    path.write_bytes(bytes(data))
    try:
        source = load_source(folder, 2)
    except DataError as e:
        assert "\n" not in str(e)
        return
    for info in source.tensors.values():
        assert all(offset + n <= p.stat().st_size for p, offset, n in info.ranges(0, info.numel))
