"""`bema-offline weights`: every output's effective weights from the checkpoint names alone, as a table, a text chart
and a PNG."""

import os
import re
import sys

import pytest
from run_entry import run_cli

from bema_offline.cli import cli
from bema_offline.methods.registry import make_method
from bema_offline.methods.schedule import BEMASchedule

STEPS = [400, 800, 1200]


@pytest.fixture
def run_dir(tmp_path):
    """A run whose checkpoints hold nothing readable: a FIFO named model.safetensors (reading it would hang) and a
    trainer_state.json that is not JSON. `weights` must not open either."""
    run = tmp_path / "run"
    for step in STEPS:
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        os.mkfifo(folder / "model.safetensors")
        (folder / "trainer_state.json").write_text("{not json")
    return run


def weights_cli(args, capsys):
    return run_cli(cli, ["weights", *args], capsys)


def printed_weights(out: str) -> list[dict[int, float]]:
    """The text charts' numbers, one dict per output, in order."""
    outputs, current = [], None
    for line in out.splitlines():
        match = re.fullmatch(r"\s*(base|checkpoint-(\d+)) ([+-]\d+\.\d{6}) [#-]*", line)
        if match:
            step = 0 if match.group(1) == "base" else int(match.group(2))
            current[step] = float(match.group(3))
        elif "(weights sum to " in line:
            current = {}
            outputs.append(current)
    return outputs


def test_bema_weights_from_names_alone(run_dir, capsys):
    code, out, err = weights_cli([run_dir, "--base-model", "Qwen/Qwen2.5-0.5B"], capsys)
    assert code == 0, err
    assert "checkpoints: 3 (steps 400, 800, 1200); base model: given" in out
    assert "BEMA, replayed as TRL's BEMACallback computes it, at step 1200 (weights sum to 1.000000)" in out
    # DESIGN.md §2, worked numbers with TRL's defaults
    assert printed_weights(out) == [{0: 0.649052, 400: 0.046281, 800: 0.034126, 1200: 0.270541}]


def test_a_grid_of_methods_prints_each_output_and_a_table(run_dir, capsys, tmp_path):
    grid = ["method=bema,ouema,uniform,power-ema,wsm,expo", "last=2", "sigma_rel=0.1", "decay=cosine", "alpha=0.5"]
    code, out, err = weights_cli([run_dir, "--base-model", "b", "--update-freq", "400", "--grid", *grid], capsys)
    assert code == 0, err
    configs = {
        "bema": ("bema", {}),
        "ouema": ("ouema", {}),
        "uniform-last2": ("uniform", {"last": 2}),
        "power-ema-sigma0.1": ("power-ema", {"sigma_rel": 0.1}),
        "wsm-cosine-last2": ("wsm", {"decay": "cosine", "last": 2}),
        "expo-alpha0.5": ("expo", {"alpha": 0.5}),
    }
    printed = printed_weights(out)
    assert len(printed) == len(configs)
    wanted = {}
    for (name, (method, params)), shown in zip(configs.items(), printed):
        assert f"config {name}: " in out
        wanted[name] = make_method(method, params, schedule=BEMASchedule(update_freq=400)).weights(STEPS, base=True)
        assert shown == {step: pytest.approx(weight, abs=5e-7) for step, weight in wanted[name].items()}
    table = out[out.index("weights by source, one column per output:") :].splitlines()
    assert table[1].split() == ["source", *configs]
    for row, step in zip(table[2:], [0, *STEPS], strict=True):
        want = [f"{wanted[name][step]:+.6f}" if step in wanted[name] else "." for name in configs]
        assert row.split() == ["base" if step == 0 else f"checkpoint-{step}", *want]


def test_a_sweep_file_with_methods(run_dir, capsys, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {name: avg, method: uniform}\n- {method: ema, half_life: 400}\n")
    code, out, err = weights_cli([run_dir, "--sweep", sweep], capsys)
    assert code == 0, err
    assert printed_weights(out) == [{400: 0.333333, 800: 0.333333, 1200: 0.333333}, {400: 0.25, 800: 0.25, 1200: 0.5}]
    assert "config avg: uniform average of every checkpoint, at step 1200" in out
    assert "config ema-halflife400: EMA of the checkpoints with a half-life of 400 steps" in out


@pytest.mark.parametrize(
    "args, code, needle",
    [
        ([], 2, "update_after is 0, so θ0 is the model before training: pass --base-model"),
        (["--method", "uniform", "--last", "4"], 1, "uniform: last 4 checkpoints asked for, but there are 3"),
        (["--last", "2"], 2, "last does not apply to bema"),
        (["--method", "power-ema"], 2, "power-ema needs --sigma-rel"),
        (["--method", "power-ema", "--sigma-rel", "0.5"], 2, "sigma_rel must lie in"),
        (["--method", "expo", "--alpha", "0.3"], 2, "pass --base-model, or --ref-step"),
        (["--method", "uniform", "--window", "1:2"], 1, "window 1:2 holds no checkpoint"),
        (["--method", "uniform", "--window", "x"], 2, "--window: window 'x': write A:B (steps A to B), A: or :B"),
        (["--grid", "method=uniform", "last=9"], 1, "config uniform-last9: uniform: last 9 checkpoints asked for"),
        (["--grid", "method=bema", "--sweep", "s.yaml"], 2, "exclude each other"),
        (["--method", "mean"], 2, "Invalid value for '--method'"),
        (["--method", "uniform", "--plot", "/nonexistent/dir/w.png"], 2, "--plot /nonexistent/dir/w.png: cannot write it"),
    ],
)
def test_errors_are_one_line(run_dir, capsys, args, code, needle):
    got, _, err = weights_cli([run_dir, *args], capsys)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_plot_draws_every_output_on_one_png(run_dir, capsys, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    plot = tmp_path / "weights.png"
    code, out, err = weights_cli(
        [run_dir, "--base-model", "b", "--grid", "method=bema,ema,uniform", "--plot", plot], capsys
    )
    assert code == 0, err
    assert out.rstrip().endswith(f"wrote {plot}")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(plot)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    rgb = pixels[..., :3].reshape(-1, 3)
    coloured = (rgb.max(axis=1) - rgb.min(axis=1)) > 0.3  # the lines and markers, not the grey axes and text
    assert coloured.sum() > 500


def test_plot_without_matplotlib_says_what_to_install(run_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    code, out, err = weights_cli([run_dir, "--method", "uniform", "--plot", tmp_path / "w.png"], capsys)
    assert code == 2 and err.strip() == "error: --plot needs matplotlib: pip install 'bema-offline[plot]'"
    assert "uniform average of every checkpoint" in out and not (tmp_path / "w.png").exists()


def test_help_lists_the_methods_and_their_options(capsys):
    code, out, _ = weights_cli(["--help"], capsys)
    assert code == 0
    for needle in ("Method (what to average", "--sigma-rel X", "spacing limits its fidelity", "--window A:B|N", "negative", "Examples:",
                   "Schedule (TRL's BEMACallback", "--grid", "--plot"):
        assert needle in out, needle


def test_weights_does_not_import_torch(run_dir, tmp_path):
    """The command reads names only, and starts fast: not even torch is imported."""
    import subprocess

    script = (
        "import sys\nfrom bema_offline.cli import _run, cli\n"
        f"try:\n    _run(cli, ['weights', {str(run_dir)!r}, '--method', 'uniform'])\nexcept SystemExit as e:\n    assert not e.code\n"
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
