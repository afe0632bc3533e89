import os

import pytest

from bema_offline import UsageError
from bema_offline.errors import OutputExistsError
from bema_offline.output.publish import OutputLock, check_output, fresh_staging, publish, staging_path


def test_a_second_lock_on_the_same_output_is_refused(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        with pytest.raises(UsageError, match=r"being written by another bema-offline run \(pid \d+\)"):
            with OutputLock(out):
                pass
    with OutputLock(out):  # released
        pass
    assert not list(tmp_path.iterdir())


def test_staging_leftovers_are_reported_and_replaced(tmp_path):
    out = tmp_path / "out"
    staging, leftovers = fresh_staging(out)
    (staging / "half.safetensors").write_bytes(b"partial")
    staging, leftovers = fresh_staging(out)
    assert leftovers and staging == staging_path(out) and not list(staging.iterdir())


def test_publish_renames_and_replaces_only_when_allowed(tmp_path):
    out = tmp_path / "out"
    staging, _ = fresh_staging(out)
    (staging / "a").write_text("1")
    publish(staging, out, overwrite=False)
    assert (out / "a").read_text() == "1" and not staging.exists()
    staging, _ = fresh_staging(out)
    (staging / "b").write_text("2")
    with pytest.raises(OutputExistsError):
        publish(staging, out, overwrite=False)
    publish(staging, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_protects_inputs(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    check_output(run / "avg", overwrite=False, run_dir=run, source_folders=[ckpt])  # inside the run: fine
    for bad in (run, tmp_path, ckpt, ckpt / "avg"):
        with pytest.raises(UsageError, match="input"):
            check_output(bad, overwrite=True, run_dir=run, source_folders=[ckpt])


def test_a_stale_lock_of_a_killed_run_is_removed_by_name(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.bema-lock"
    stale.write_text("999999")  # a dead pid
    with open(stale, "rb") as old:  # kept open, so that its inode cannot be reused for the new lock
        with OutputLock(out) as lock:
            assert lock.path.read_text() == str(os.getpid())
            assert os.fstat(old.fileno()).st_nlink == 0  # unlinked by name...
            assert old.read() == b"999999"  # ...and never written through
    assert not stale.exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "large"])
def test_a_lock_name_that_is_not_a_lock_file_is_refused_and_left_alone(tmp_path, kind):
    out, precious = tmp_path / "out", tmp_path / "precious"
    precious.write_bytes(b"x" * (100 if kind == "large" else 10))
    lock = tmp_path / ".out.bema-lock"
    if kind == "symlink":
        lock.symlink_to(precious)
    elif kind == "hardlink":
        lock.hardlink_to(precious)
    else:
        lock.write_bytes(precious.read_bytes())
    with pytest.raises(UsageError, match="not a lock file of bema-offline's"):
        with OutputLock(out):
            pass
    assert precious.read_bytes() == b"x" * (100 if kind == "large" else 10)
    assert lock.is_symlink() if kind == "symlink" else lock.exists()


def test_check_output_refuses_outputs_named_like_checkpoints(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    for bad in (run / "checkpoint-12", run / "checkpoint-3" / "avg"):
        with pytest.raises(UsageError, match="named like a checkpoint"):
            check_output(bad, overwrite=True, run_dir=run, source_folders=[ckpt])
    check_output(run / "checkpoints-avg", overwrite=False, run_dir=run, source_folders=[ckpt])  # another name: fine
