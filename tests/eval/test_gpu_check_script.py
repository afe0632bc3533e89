"""scripts/gpu_check.sh on the CPU: it skips with its reason without a GPU, and with GPU_CHECK_DEVICE=cpu its two checks
run (on the demo run of this session), print PASS and FAIL lines, and a failure exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's python and commands
    variables = {**os.environ, "PATH": path, "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=variables, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the script runs its checks instead")
def test_without_a_gpu_it_skips_and_says_why(tmp_path: Path) -> None:
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SKIP: torch.cuda.is_available() is False (torch ")
    assert result.stdout.rstrip().endswith("run this on a machine with a CUDA GPU")


def test_on_the_cpu_the_checks_run_and_a_failure_exits_non_zero(demo, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "demo").symlink_to(demo.run_dir.parent)  # the session's demo run: run/, averaged/
    (work / "heldout.jsonl").symlink_to(demo.heldout)
    result = run_script(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_WORKDIR=str(work), GPU_CHECK_RTOL_BF16="0")
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert any(line.startswith("PASS: eval --device cpu --dtype float32 vs --device cpu float32: largest relative "
                               "difference 0.00e+00") for line in lines)
    assert any(line.startswith("FAIL: eval --device cpu --dtype bfloat16") for line in lines)  # bf16 is not exact
    assert "PASS: bema-average --device cpu ema vs TRL's ops on cpu: 20 of 20 tensors equal bit for bit" in lines
    assert "PASS: bema-average --device cpu bema vs TRL's ops on cpu: 20 of 20 tensors equal bit for bit" in lines
    assert lines[-1] == "FAIL: 1 of 2 checks failed"
    assert sorted(p.name for p in (demo.averaged).iterdir()) == ["bema", "ema"]  # the shared run is untouched
