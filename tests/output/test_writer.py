import hashlib
import json
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from synthetic import make_run

from bema_offline import BEMASchedule, DataError, UsageError, average
from bema_offline.files import OpenFiles, writable_view
from bema_offline.output import writer
from bema_offline.output.writer import ModelFolderWriter, ShardDigest, TensorSpec, copy_sidecar_files, parse_size, shard_tensors
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
        folder = ModelFolderWriter(tmp_path, specs, max_shard_size=30, files=files)
        folder.write("v", 4, writable_view(values["v"][4:]))
        folder.write("w", 0, writable_view(values["w"].flatten()))
        folder.write("n", 0, writable_view(values["n"]))
        folder.write("v", 0, writable_view(values["v"][:4]))
    folder.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in values.values())
    files = sorted(p.name for p in tmp_path.iterdir())  # three shards and the index, each hashed as written
    assert len(files) == 4
    assert folder.digests() == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in files}
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


# --- sha256 while writing ---------------------------------------------------------------------------------------


def write_in_pieces(path: Path, header: bytes, data: bytes, pieces: list[tuple[int, int]], threads: int) -> ShardDigest:
    """Create a shard with its header, then write `data`'s pieces (start, stop) from `threads` threads at once, in the
    order given (each thread takes the next piece), each followed by `ShardDigest.wrote`, as the writer does."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.pwrite(fd, header, 0)
    os.ftruncate(fd, len(header) + len(data))
    digest = ShardDigest(path, header, len(header) + len(data))
    queue = list(reversed(pieces))
    lock = threading.Lock()
    errors = []

    def work():
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    start, stop = queue.pop()
                view = memoryview(data)[start:stop]
                os.pwrite(fd, view, len(header) + start)
                digest.wrote(len(header) + start, view)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    os.close(fd)
    assert not errors, errors
    return digest


def random_pieces(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, size), count - 1))
    return list(zip([0, *cuts], [*cuts, size]))


@pytest.mark.parametrize("seed", range(6))
def test_shard_sha256_is_right_whatever_the_order_and_the_threads(tmp_path, seed):
    rng = random.Random(seed)
    header, data = rng.randbytes(24), rng.randbytes(rng.choice([1000, 300_000, 1_500_000]))
    pieces = random_pieces(rng, len(data), rng.choice([2, 17, 400]))
    rng.shuffle(pieces)
    digest = write_in_pieces(tmp_path / "shard", header, data, pieces, threads=rng.choice([1, 2, 4]))
    assert digest.sha256 == hashlib.sha256(header + data).hexdigest()  # from the bytes meant, not the file
    assert (tmp_path / "shard").read_bytes() == header + data


def test_in_file_order_nothing_is_read_back_and_in_reverse_all_but_the_first_piece(tmp_path):
    rng = random.Random(0)
    header, data = b"H" * 16, rng.randbytes(2_000_000)
    pieces = random_pieces(rng, len(data), 50)
    forward = write_in_pieces(tmp_path / "forward", header, data, pieces, threads=1)
    backward = write_in_pieces(tmp_path / "backward", header, data, pieces[::-1], threads=1)
    assert forward.sha256 == backward.sha256 == hashlib.sha256(header + data).hexdigest()
    assert forward.read_back == 0
    assert backward.read_back == len(data) - (pieces[0][1] - pieces[0][0])


def test_a_shard_not_yet_complete_has_no_sha256(tmp_path):
    digest = write_in_pieces(tmp_path / "shard", b"H" * 8, b"0123456789", [(0, 4), (6, 10)], threads=1)
    assert digest.sha256 is None  # bytes 4 to 6 were never written
    digest.wrote(8 + 4, memoryview(b"45"))
    assert digest.sha256 == hashlib.sha256(b"H" * 8 + b"0123456789").hexdigest()


def test_a_shard_cut_short_while_it_is_read_back_is_an_error(tmp_path):
    path = tmp_path / "shard"
    digest = write_in_pieces(path, b"H" * 8, b"0123456789", [(4, 10)], threads=1)
    os.truncate(path, 12)  # something else truncates the shard before the hash reaches the noted bytes
    with pytest.raises(DataError, match="shard ended at byte 12 while being hashed"):
        digest.wrote(8, memoryview(b"0123"))
    assert digest.sha256 is None


@pytest.mark.parametrize("threads, budget", [(1, 2**20), (2, 16384)])
def test_an_average_records_the_sha256_of_every_weight_file(tmp_path, monkeypatch, threads, budget):
    """With one thread and float tensors only, the engine writes in file order: every byte is hashed from the buffer
    it is written from, none read back. With two threads, small groups, a frozen and an integer tensor (copied in
    groups of their own, out of order), bytes are read back, and the sha256 are still those of the files."""
    digests = []
    monkeypatch.setattr(writer, "ShardDigest", lambda *args: digests.append(ShardDigest(*args)) or digests[-1])
    extra = {"position_ids": torch.arange(7)} if threads > 1 else None
    frozen = ("model.norm.weight",) if threads > 1 else ()
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4], extra=extra, frozen=frozen)
    out = tmp_path / "out"
    average(run_dir, out, schedule=BEMASchedule(update_freq=2), base_model=base_dir, max_shard_size="500B", max_memory=budget, threads=threads)
    record = json.loads((out / "bema_offline.json").read_text())
    files = sorted(p.name for p in out.iterdir() if "safetensors" in p.name)
    assert [entry["name"] for entry in record["output_files"]] == files and len(files) > 3
    for entry in record["output_files"]:
        assert entry["sha256"] == hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest()
    read_back = sum(digest.read_back for digest in digests)
    assert read_back == 0 if threads == 1 else read_back > 0
