"""Runs in the sharded layouts, written once per session by the libraries that write them (see `sharded_writers.py`)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="session")
def sharded_runs(tmp_path_factory) -> Path:
    """`ROOT/fsdp`, `ROOT/columns` and (where DeepSpeed is installed) `ROOT/zero{1,2,3}`, written by 2 ranks."""
    root = tmp_path_factory.mktemp("sharded")
    script = Path(__file__).parent / "sharded_writers.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(root)]
    result = subprocess.run(command + (["--deepspeed"] if HAS_DEEPSPEED else []), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root
