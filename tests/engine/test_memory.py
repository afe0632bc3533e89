"""Peak RSS, as the OS reports it, stays within the budget plus a constant, however much is read."""

import subprocess
import sys

import pytest
from synthetic import make_run

SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (1024, 2048) for i in range(6)}  # 8 MiB each in fp32


# Linux counts the pages of the process that forked into a child's ru_maxrss, so the command is started from a
# small launcher (plain Python, no torch) rather than from this large test process.
LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_mib(args) -> float:
    """Peak RSS of `python -m bema_offline ARGS` as the kernel reports it (what /usr/bin/time -v shows)."""
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "bema_offline", *map(str, args)],
        capture_output=True, text=True, check=True,
    )
    code, maxrss_kib = map(int, result.stdout.split())
    assert code == 0, result.stderr
    return maxrss_kib / 1024


@pytest.mark.parametrize("budget_mib", [16, 64])
def test_peak_rss_is_bounded_by_the_budget(tmp_path, budget_mib):
    """A run that reads 336 MiB grows past a run that reads 12 KiB by at most the budget and a little slack:
    everything else (Python, torch, the card's chart) is the same in both."""
    tiny_run, tiny_base, _ = make_run(tmp_path / "tiny", [1, 2, 3, 4, 5, 6])
    big_run, big_base, _ = make_run(tmp_path / "big", [1, 2, 3, 4, 5, 6], shapes=SHAPES, seed=3)  # 7 × 48 MiB
    options = ["--update-freq", "1", "-q", "--max-memory", f"{budget_mib}MiB", "--save", "ema,bema"]
    baseline = peak_rss_mib(["average", tiny_run, "--base-model", tiny_base, "-o", tmp_path / "tiny-out", *options])
    peak = peak_rss_mib(["average", big_run, "--base-model", big_base, "-o", tmp_path / "big-out", *options])
    assert peak - baseline < budget_mib + 24, (peak, baseline)
