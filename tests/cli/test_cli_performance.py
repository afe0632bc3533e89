"""The Performance options: --threads and --device."""

import pytest
import torch
from synthetic import make_run

from cli.test_average import run_cli


@pytest.fixture
def common(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6, 8], shards=2)
    return [run_dir, "--base-model", base_dir, "--update-freq", "2", "-q"]


def test_threads_do_not_change_the_output(common, tmp_path, capsys):
    for threads in (1, 3):
        code, _, err = run_cli([*common, "--threads", threads, "--max-memory", "8000", "-o", tmp_path / f"t{threads}"], capsys)
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
