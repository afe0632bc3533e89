"""The Performance options: --threads and --device; and what a run loads."""

import subprocess
import sys

import pytest
import torch
from cli.test_average import run_cli
from synthetic import make_run

from bema_offline.engine import kernels


@pytest.fixture
def common(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6, 8], shards=2)
    return [run_dir, "--base-model", base_dir, "--update-freq", "2", "-q"]


def test_threads_do_not_change_the_output(common, tmp_path, capsys):
    for threads in (1, 3):
        code, _, err = run_cli([*common, "--threads", threads, "--max-memory", "8000B", "-o", tmp_path / f"t{threads}"], capsys)
        assert code == 0, err
    for shard in sorted((tmp_path / "t1").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "t3" / shard.name).read_bytes()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--threads", "0"], "--threads must be at least 1"),
        (["--device", "tpu"], "--device 'tpu': not a device; use cpu, cuda or cuda:N"),
        (["--device", "mps"], "--device mps: only cpu and cuda are supported"),
        pytest.param(["--device", "cuda"], "torch sees no CUDA GPU here",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
    ],
)
def test_bad_performance_options_are_one_line_usage_errors(common, tmp_path, capsys, args, needle):
    code, _, err = run_cli([*common, *args, "-o", tmp_path / "o"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(kernels.kernel_name() is None, reason="the C kernel was not built")
@pytest.mark.parametrize("dtype, imports_torch", [(torch.bfloat16, False), (torch.float32, False), (torch.float16, True)])
def test_bema_average_imports_torch_only_where_the_kernel_does_not_cover_the_run(tmp_path, dtype, imports_torch):
    """Importing torch takes seconds, more than averaging a 1 GiB model: a bf16 or float32 run (the kernel's) never
    loads it, from the command line to the published folder, nor does `verify` of that folder with recomputed
    tensors; an fp16 run does (torch's ops), and both publish."""
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4], dtype=dtype, extra={"position_ids": torch.arange(9)})
    out = tmp_path / "out"
    code = f"""
import sys
from bema_offline.cli import _run, average_command, cli
try:
    _run(average_command, [{str(run_dir)!r}, "--base-model", {str(base_dir)!r}, "--update-freq", "2", "-o", {str(out)!r}, "-q"])
    _run(cli, ["verify", {str(out)!r}, "--recompute", "3"])
except SystemExit as e:
    print("exit", e.code)
print("torch imported:", "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "exit" not in result.stdout and f"ok {out}" in result.stdout, result.stdout + result.stderr
    assert f"torch imported: {imports_torch}" in result.stdout
    assert (out / "model.safetensors").is_file()
