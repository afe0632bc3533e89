import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bema_offline import DataError, UsageError
from bema_offline.files import OpenFiles, writable_view
from bema_offline.output.writer import ModelFolderWriter, TensorSpec, copy_sidecar_files, parse_size, shard_tensors
from bema_offline.sources.run import sidecar_origins


@pytest.mark.parametrize(
    "text, size",
    [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), ("1.5KB", 1500), ("100", 100), ("2 gib", 2 * 2**30), (7, 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_garbage():
    with pytest.raises(UsageError, match="--max-memory 'lots'"):
        parse_size("lots", option="--max-memory")


def test_shards_follow_order_and_size():
    specs = [TensorSpec(n, "F32", (10,)) for n in "abcde"]  # 40 bytes each
    assert [[s.name for s in shard] for shard in shard_tensors(specs, 100)] == [["a", "b"], ["c", "d"], ["e"]]
    big = [TensorSpec("huge", "F32", (100,)), TensorSpec("x", "F32", (1,))]
    assert [[s.name for s in shard] for shard in shard_tensors(big, 50)] == [["huge"], ["x"]]


def test_slices_written_in_any_order_read_back_with_safetensors(tmp_path):
    specs = [TensorSpec("w", "BF16", (4, 3)), TensorSpec("n", "I64", (5,)), TensorSpec("v", "F32", (7,))]
    values = {"w": torch.randn(4, 3).to(torch.bfloat16), "n": torch.arange(5), "v": torch.randn(7)}
    with OpenFiles(writable=True) as files:
        writer = ModelFolderWriter(tmp_path, specs, max_shard_size=30, files=files)
        writer.write("v", 4, writable_view(values["v"][4:]))
        writer.write("w", 0, writable_view(values["w"].flatten()))
        writer.write("n", 0, writable_view(values["n"]))
        writer.write("v", 0, writable_view(values["v"][:4]))
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in values.values())
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), values[name])
        header_len = int.from_bytes((tmp_path / shard).read_bytes()[:8], "little")
        assert header_len % 8 == 0


def test_sidecar_files_come_from_the_first_source_that_has_them(tmp_path):
    newest, base, out = tmp_path / "newest", tmp_path / "base", tmp_path / "out"
    for folder in (newest, base, out):
        folder.mkdir()
    (newest / "config.json").write_text(json.dumps({"torch_dtype": "float32", "dtype": "float32", "hidden_size": 8}))
    (base / "config.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")
    (base / "optimizer.pt").write_text("no")
    copied = copy_sidecar_files(sidecar_origins([newest, base]), out, dtype="bfloat16")
    assert copied == ["config.json", "tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    assert config == {"torch_dtype": "bfloat16", "dtype": "bfloat16", "hidden_size": 8}
    assert not (out / "optimizer.pt").exists()


def test_a_sidecar_that_disappeared_since_planning_is_refused(tmp_path):
    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir(), out.mkdir()
    (base / "config.json").write_text("{}")
    planned = sidecar_origins([base])
    (base / "config.json").unlink()
    with pytest.raises(DataError, match="config.json: disappeared during the run"):
        copy_sidecar_files(planned, out)


def test_a_link_left_where_a_sidecar_goes_is_replaced_not_written_through(tmp_path):
    base, out, precious = tmp_path / "base", tmp_path / "out", tmp_path / "precious"
    base.mkdir(), out.mkdir()
    (base / "config.json").write_text('{"a": 1}')
    precious.write_text("keep")
    (out / "config.json").symlink_to(precious)  # left in a resumed staging folder, say
    copy_sidecar_files(sidecar_origins([base]), out)
    assert precious.read_text() == "keep" and not (out / "config.json").is_symlink()
    assert (out / "config.json").read_text() == '{"a": 1}'


def _fallocate_works(folder: Path) -> bool:
    import os

    from bema_offline.files import _fallocate

    fd = os.open(folder / "probe", os.O_CREAT | os.O_WRONLY)
    try:
        return _fallocate(fd, 0, 0, 2**20) == 0
    finally:
        os.close(fd)
        os.unlink(folder / "probe")


def test_shards_are_preallocated_on_disk_but_not_on_tmpfs(tmp_path):
    """Disk blocks are reserved when a shard is created (a full disk fails there, and writing costs less CPU);
    on tmpfs nothing is reserved, as that would only zero every page first."""
    import os

    from bema_offline.files import _fallocate, _in_memory

    specs = [TensorSpec("w", "F32", (1024, 1024))]
    folders = {"tmp_path": tmp_path}
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        folders["/dev/shm"] = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        for folder in folders.values():
            with OpenFiles(writable=True) as files:
                ModelFolderWriter(folder / "out", specs, max_shard_size=2**30, files=files)
            shard = folder / "out" / "model.safetensors"
            fd = os.open(shard, os.O_RDONLY)
            try:
                in_memory = _in_memory(fd)
            finally:
                os.close(fd)
            allocated = shard.stat().st_blocks * 512
            if in_memory:
                assert allocated < 64 * 1024, f"{shard}: tmpfs pages allocated up front"
            elif _fallocate is not None and _fallocate_works(folder):
                assert allocated >= 4 * 2**20, f"{shard}: disk blocks not reserved"
    finally:
        if "/dev/shm" in folders:
            shutil.rmtree(folders["/dev/shm"])
