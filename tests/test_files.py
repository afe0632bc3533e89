"""`bema_offline.files`: inputs that change, hang or point elsewhere are refused in one line, and output files are
only ever created, never written through."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from synthetic import make_run

from bema_offline import BEMASchedule, DataError, average
from bema_offline.files import FileIdentity, OpenFiles, create_new_file, read_small_file


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "trainer_state.json"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: _catch(result, lambda: read_small_file(fifo, what="trainer state")))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert isinstance(result[0], DataError) and "not a regular file" in str(result[0])


def _catch(into: list, call) -> None:
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - handed to the test
        into.append(e)


def test_devices_folders_and_huge_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a regular file"):
        read_small_file(Path("/dev/zero"), what="config")
    with pytest.raises(DataError, match="not a regular file"):
        read_small_file(tmp_path, what="config")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(DataError, match="2000 bytes, more than 1000"):
        read_small_file(big, limit=1000, what="index")
    assert read_small_file(big, limit=2000) == b" " * 2000


def test_create_new_file_never_follows_a_link_nor_truncates(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me")
    link = tmp_path / "link"
    link.symlink_to(precious)
    with pytest.raises(FileExistsError):
        create_new_file(link)
    with pytest.raises(FileExistsError):
        create_new_file(precious)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(FileExistsError):
        create_new_file(dangling)
    assert precious.read_bytes() == b"keep me" and not (tmp_path / "created-through-the-link").exists()


def test_open_files_refuses_a_file_replaced_since_it_was_planned(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 64)
    planned = FileIdentity.of(os.stat(path))
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 64)
    os.replace(replacement, path)  # same name and size, another file
    with OpenFiles(identities={path: planned}) as files, pytest.raises(DataError, match="replaced by another file"):
        files.read_into(path, 0, memoryview(bytearray(8)))


def test_a_checkpoint_rewritten_in_place_during_the_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same size, new bytes and mtime, while the engine reads: the output would mix two versions. Nothing is
    written, and the message names the file."""
    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3])
    victim = run_dir / "checkpoint-2" / "model.safetensors"
    original = OpenFiles.read_into
    rewritten = []

    def read_then_rewrite(self, path, offset, view):
        original(self, path, offset, view)
        if not rewritten and Path(path) == victim:
            with open(victim, "r+b") as f:  # in place: same inode, same size, new bytes at the end
                f.seek(-16, os.SEEK_END)
                f.write(bytes(range(16)))
            rewritten.append(True)

    monkeypatch.setattr(OpenFiles, "read_into", read_then_rewrite)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"{victim}: it was rewritten .* while this run was reading it"):
        average(run_dir, out, schedule=BEMASchedule(update_freq=1), base_model=base_dir, threads=1)
    assert rewritten and not out.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())
