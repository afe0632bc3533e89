"""Publishing under faults: the atomic exchange and its fallback, leftovers of killed runs, and Ctrl-C while renaming."""

import os
import signal
import time

import pytest

from bema_offline.errors import OutputExistsError
from bema_offline.output import publish as publish_module
from bema_offline.output.publish import (
    OutputLock,
    check_output,
    fresh_staging,
    interrupts_deferred,
    leftovers,
    lock_path,
    publish,
    staging_path,
    trash_path,
)


def staged(output, name, text):
    staging, _ = fresh_staging(output)
    (staging / name).write_text(text)
    return staging


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_the_old_output_and_leaves_nothing(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish_module, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    publish(staged(out, "a", "old"), out, overwrite=False)
    publish(staged(out, "b", "new"), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_a_link_and_a_file(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    out.symlink_to(tmp_path / "elsewhere")
    publish(staged(out, "b", "new"), out, overwrite=True)
    assert out.is_dir() and not out.is_symlink() and (tmp_path / "elsewhere").is_dir()
    out2 = tmp_path / "out2"
    out2.write_text("a file")
    publish(staged(out2, "c", "new"), out2, overwrite=True)
    assert (out2 / "c").read_text() == "new"


def test_the_exchange_is_atomic_where_the_system_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.write_text("b")
    if not publish_module._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert a.read_text() == "b" and b.is_dir()


def test_leftovers_of_a_killed_run_are_named_when_the_output_exists(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    staging_path(out).mkdir()
    lock_path(out).write_text("4242")  # a dead run's lock: nobody holds it
    assert leftovers(out) == [staging_path(out), lock_path(out)]
    with pytest.raises(OutputExistsError, match=f"a killed run also left {staging_path(out)} {lock_path(out)}: delete them"):
        check_output(out, overwrite=False, run_dir=tmp_path / "run", source_folders=[])


def test_a_running_runs_files_are_not_leftovers(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        staging_path(out).mkdir()
        assert leftovers(out) == []
    assert leftovers(out) == [staging_path(out)]


def test_a_stale_lock_is_taken_over_and_removed(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text("4242")
    with OutputLock(out):
        assert lock_path(out).read_text() == str(os.getpid())
    assert not lock_path(out).exists()


def test_the_old_output_moved_aside_by_a_killed_overwrite_is_removed(tmp_path):
    from bema_offline.output.resume import prepare_staging

    out = tmp_path / "out"
    out.mkdir()  # the new output is in place: the old one is no longer needed
    trash_path(out).mkdir()
    staging = prepare_staging(out, {"tool": "x"}, resume=False)
    assert staging.removed_leftovers and not trash_path(out).exists() and out.is_dir()


def test_an_overwrite_killed_between_its_two_renames_gets_the_old_output_back(tmp_path):
    """Where the file system has no atomic exchange (NFS), publish renames the old output aside, then the new one in:
    a kill between the two leaves no output; the next run puts the old one back rather than deleting it."""
    from bema_offline.output.resume import prepare_staging

    out = tmp_path / "out"
    trash_path(out).mkdir()
    (trash_path(out) / "model.safetensors").write_bytes(b"the old output")
    staging = prepare_staging(out, {"tool": "x"}, resume=False)
    assert staging.removed_leftovers and (out / "model.safetensors").read_bytes() == b"the old output"
    assert not trash_path(out).exists()


def test_the_state_of_a_killed_no_keep_downloads_run_is_a_leftover_and_removed(tmp_path):
    from bema_offline.output.publish import leftovers, state_path
    from bema_offline.output.resume import prepare_staging

    out = tmp_path / "out"
    (state_path(out) / ".bema-state-x").mkdir(parents=True)
    (state_path(out) / ".bema-state-x" / "ema.state").write_bytes(b"\0" * 1024)
    assert leftovers(out) == [state_path(out)]
    staging = prepare_staging(out, {"tool": "x"}, resume=True)
    assert staging.removed_leftovers and not state_path(out).exists()


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """Python's KeyboardInterrupt handler for SIGINT during the test: pytest run as a background job (`pytest &`)
    starts with SIGINT ignored, and the Ctrl-C this test sends would then do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_publishing_is_held_off(tmp_path, ctrl_c_as_in_a_terminal):
    out = tmp_path / "out"
    staging = staged(out, "a", "1")
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        publish(staging, out, overwrite=False)
    assert (out / "a").read_text() == "1"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # and afterwards Ctrl-C works again
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
