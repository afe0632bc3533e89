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
