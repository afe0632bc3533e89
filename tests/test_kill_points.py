"""Kill, interrupt, starve and race `bema-average` at every fault point (`tests/faultkit.py`): at `--output` there is
only ever nothing, the old output, or the complete new one; the next run recovers; the inputs never change."""

import json
import signal
import subprocess
import sys
from pathlib import Path

from bema_offline.faults import POINTS

HARNESS = Path(__file__).with_name("faultkit.py")


def ctrl_c_as_in_a_terminal() -> None:
    """Run in the child before it starts: a shell starts background jobs (`pytest &`) with SIGINT ignored, and the
    child would inherit that, so that the Ctrl-C these tests send would do nothing. With the default disposition,
    Python installs its KeyboardInterrupt handler as it does in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_faults_at_every_point(tmp_path):
    results = tmp_path / "results.json"
    process = subprocess.run(
        [sys.executable, str(HARNESS), str(tmp_path / "work"), str(results), "--per-point", "1"],
        capture_output=True, text=True, timeout=600, preexec_fn=ctrl_c_as_in_a_terminal,
    )
    assert results.exists(), process.stderr
    summary = json.loads(results.read_text())
    records = summary["records"]
    problems = [
        f"{r['scenario']} {r['action']} at {r['point']} #{r['hit']}: {'; '.join(r['problems'])}" for r in records if r["problems"]
    ]
    assert not problems, "\n".join(problems)
    assert process.returncode == 0, process.stderr

    killed = {r["point"] for r in records if r["action"] == "SIGKILL" and r["scenario"] == "fresh"}
    assert killed == set(POINTS)  # every point of the write path was passed, and killed at
    assert {r["state"] for r in records if r["action"] == "SIGKILL"} == {"absent", "old", "new"}
    assert all(r["inputs_unchanged"] for r in records)
    resumed = [x for r in records if r["action"] == "SIGKILL" for x in r["recovery"] if x["resume"]]
    assert resumed and any(x["reused_shards"] > 0 for x in resumed)
    # killed once the last shard was recorded: --resume reuses every shard (not a matter of timing)
    last = [r for r in records if r["action"] == "SIGKILL" and r["point"] == "shard-done" and r["hit"] == r["hits"]]
    assert last and all(x["reused_shards"] > 1 for r in last for x in r["recovery"] if x["resume"])
    assert {r["action"] for r in records} >= {"SIGKILL", "SIGINT", "ENOSPC", "EIO", "RLIMIT_FSIZE", "second run"}


def test_ctrl_c_in_a_real_process_through_the_environment_hook(tmp_path):
    """`BEMA_OFFLINE_FAULT` arms the hook in an ordinary `python -m bema_offline` process: Ctrl-C mid-write exits
    130 with one line, and leaves nothing, not even the lock."""
    import os

    from synthetic import make_run

    run_dir, base_dir, _ = make_run(tmp_path, [1, 2, 3])
    before = sorted(p for p in tmp_path.rglob("*"))
    env = {**os.environ, "BEMA_OFFLINE_FAULT": "write:3:int", "PYTHONPATH": str(HARNESS.parents[1])}
    process = subprocess.run(
        [sys.executable, "-m", "bema_offline", "average", run_dir, "--base-model", base_dir, "--update-freq", "1",
         "--max-memory", "4KiB", "-q"],
        capture_output=True, text=True, env=env, timeout=300, preexec_fn=ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    # click ends the terminal's "^C" line first, so the message follows an empty line
    assert process.returncode == 130 and process.stderr.strip() == "interrupted; nothing was written"
    assert sorted(p for p in tmp_path.rglob("*")) == before
