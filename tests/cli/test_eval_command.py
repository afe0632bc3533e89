"""`bema-offline eval` run like the entry point: the ranked table, the files, --publish-best, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from run_entry import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from eval_runs import demo_sweep, grid_sweep  # noqa: E402  (the runs tests/eval builds, shared in the session)

from bema_offline.cli import cli  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return grid_sweep(tmp_path_factory)


@pytest.fixture(autouse=True)
def quick(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_demo_ranked_from_the_command_line(demo, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    code, stdout, stderr = run_cli(cli, ["eval", demo.averaged, "--data", demo.heldout, "--baselines", "-o", out], capsys)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "ranked by loss (lower is better); * the winner"
    assert lines[1].split() == ["rank", "model", "loss", "perplexity"]
    assert lines[2].split()[:3] == ["1", "bema", "*"] and float(lines[2].split()[3]) == pytest.approx(demo.demo_losses["bema"], rel=1e-5)
    assert "checkpoint-240 (last) [baseline]" in lines[3]
    assert lines[-1] == f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}"
    assert json.loads((out / "eval.json").read_text())["winner"] == "bema"
    assert [line.split(":")[0] for line in stderr.splitlines() if line.startswith("[")] == [
        "[1/4] bema", "[2/4] ema", "[3/4] base", "[4/4] checkpoint-240 (last)"]
    assert sorted(p.name for p in demo.averaged.iterdir()) == ["bema", "ema"]  # -o: nothing written into the sweep


def test_publish_best_and_quiet(grid, tmp_path: Path, capsys) -> None:
    sweep = shutil.copytree(grid.sweep, tmp_path / "sweep")
    code, stdout, stderr = run_cli(cli, ["eval", sweep, "--data", grid.heldout, "--publish-best"], capsys)
    assert code == 0, stderr
    winner = json.loads((sweep / "eval.json").read_text())["winner"]
    assert stdout.splitlines()[-1] == f"published {sweep / winner} as {sweep / 'best'}"
    assert (sweep / "best" / "model.safetensors").read_bytes() == (sweep / winner / "model.safetensors").read_bytes()
    (sweep / "eval.json").unlink()
    code, stdout, stderr = run_cli(cli, ["eval", sweep, "--data", grid.heldout, "--quiet"], capsys)
    assert (code, stdout, stderr) == (0, "", "")
    assert (sweep / "eval.json").is_file()  # the sweep folder is the default place for the report
    assert [r["label"] for r in json.loads((sweep / "eval.json").read_text())["results"]] != []


@pytest.mark.parametrize(
    "arguments, code, message",
    [
        ([], 2, "error: give --data (held-out data) or --lm-eval-tasks, or both"),
        (["--data", "{heldout}", "--metric", "bleu"], 2, "error: --metric bleu: choose from loss, perplexity, reward_accuracy"),
        (["--data", "{missing}"], 1, "error: --data {missing}: no such file or folder"),
        (["--data", "{heldout}", "--lm-eval-limit", "5"], 2, "error: --lm-eval-include, --lm-eval-limit and --lm-eval-num-fewshot need --lm-eval-tasks (see --help)"),
        (["--data", "{heldout}", "--publish-best", "{base}"], 2, "error: --publish-best needs exactly one sweep folder (see --help)"),
        (["--data", "{heldout}", "--beta", "0"], 2, "error: --beta must be positive, got 0.0"),
    ],
)
def test_errors_are_one_line(grid, tmp_path: Path, capsys, arguments: list[str], code: int, message: str) -> None:
    values = {"heldout": grid.heldout, "missing": tmp_path / "missing.jsonl", "base": grid.base_dir}
    arguments = [a.format(**values) for a in arguments]
    result, stdout, stderr = run_cli(cli, ["eval", grid.base_dir, *arguments], capsys)
    assert result == code and stdout == ""
    assert stderr.startswith(message.format(**values)) and stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_cuda_without_a_gpu_is_refused(grid, capsys) -> None:
    code, _, stderr = run_cli(cli, ["eval", grid.base_dir, "--data", grid.heldout, "--device", "cuda"], capsys)
    assert code == 2 and stderr.startswith("error: --device cuda: torch sees no CUDA GPU here")


def test_without_the_eval_extra_the_extra_is_named(grid) -> None:
    code = ("import sys\nsys.modules['transformers'] = None\nfrom bema_offline.cli import main\n"
            f"sys.argv = ['bema-offline', 'eval', {str(grid.base_dir)!r}, '--data', {str(grid.heldout)!r}]\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == "error: bema-offline eval needs transformers: pip install 'bema-offline[eval]'\n"
