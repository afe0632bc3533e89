"""`--grid` and `--sweep`: one folder per config from one read, each equal to its own separate run."""

import json

import pytest
from cli.test_average import run_cli
from synthetic import make_run


@pytest.fixture
def run(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6, 8])
    return run_dir, base_dir


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_grid_writes_one_folder_per_config_equal_to_separate_runs(run, tmp_path, capsys):
    run_dir, base_dir = run
    common = [run_dir, "--base-model", base_dir, "--update-freq", "2", "-q"]
    code, _, err = run_cli([*common, "--grid", "ema_power=0.3,0.5", "bias_power=0.1,0.2", "-o", tmp_path / "sweep"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert names == [f"ema_power={e},bias_power={b}" for e in ("0.3", "0.5") for b in ("0.1", "0.2")]
    for e in ("0.3", "0.5"):
        for b in ("0.1", "0.2"):
            single = tmp_path / f"single-{e}-{b}"
            code, _, err = run_cli([*common, "--ema-power", e, "--bias-power", b, "-o", single], capsys)
            assert code == 0, err
            swept = tmp_path / "sweep" / f"ema_power={e},bias_power={b}"
            assert shard_bytes(swept) == shard_bytes(single)
            record = json.loads((swept / "bema_offline.json").read_text())
            assert record["config"] == f"ema_power={e},bias_power={b}"
            assert record["schedule"]["ema_power"] == float(e) and record["schedule"]["update_freq"] == 2


def test_grid_items_may_be_repeated_options_or_one_string(run, tmp_path, capsys):
    run_dir, base_dir = run
    common = [run_dir, "--base-model", base_dir, "--update-freq", "2", "--dry-run"]
    outputs = []
    for grid in (["--grid", "ema_power=0.3,0.5", "bias_power=0.1"], ["--grid", "ema_power=0.3,0.5", "--grid", "bias_power=0.1"],
                 ["--grid", "ema_power=0.3,0.5 bias_power=0.1"]):
        code, out, err = run_cli([*common, *grid, "-o", tmp_path / "o"], capsys)
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert "output " + str(tmp_path / "o" / "ema_power=0.5,bias_power=0.1") in outputs[0]


def test_dry_run_shows_every_configs_effective_weights(run, tmp_path, capsys):
    run_dir, base_dir = run
    code, out, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "--grid", "lag=5,10,20", "--dry-run",
                              "-o", tmp_path / "o"], capsys)
    assert code == 0, err
    for lag in ("5", "10", "20"):
        assert f"schedule lag={lag}:" in out
        assert f"output {tmp_path / 'o' / f'lag={lag}'}: bema at step 8, effective weights (sum 1.000000)" in out
    assert out.count("checkpoint-8 +") == 3 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_sweep_file(run, tmp_path, capsys, suffix):
    run_dir, base_dir = run
    configs = [{"name": "slow", "ema_power": 0.3}, {"ema_power": 0.7, "bias_power": 0.1}, {"name": "late", "update_after": 4}]
    path = tmp_path / f"sweep{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(configs))
    else:
        path.write_text("- name: slow\n  ema_power: 0.3\n- ema_power: 0.7\n  bias_power: 0.1\n- {name: late, update_after: 4}\n")
    common = [run_dir, "--base-model", base_dir, "--update-freq", "2", "-q"]
    code, _, err = run_cli([*common, "--sweep", path, "-o", tmp_path / "sweep"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["ema_power=0.7,bias_power=0.1", "late", "slow"]
    code, _, err = run_cli([*common, "--update-after", "4", "-o", tmp_path / "late"], capsys)
    assert code == 0, err
    assert shard_bytes(tmp_path / "sweep" / "late") == shard_bytes(tmp_path / "late")


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--grid", "ema_pow=0.3"], 2, "unknown field 'ema_pow'"),
        (["--grid", "ema_power=fast"], 2, "ema_power must be a number"),
        (["--grid", "update_freq=2.5"], 2, "update_freq must be an integer"),
        (["--grid", "ema_power"], 2, "write FIELD=V1,V2"),
        (["--grid", "ema_power=-1"], 2, "ema_power and bias_power must be >= 0"),
        (["--grid", "ema_power=0.3", "--sweep", "x.yaml"], 2, "exclude each other"),
        (["--sweep", "SWEEP:- {name: a}\n- {name: a, lag: 3}\n"], 2, "two configs are named 'a'"),
        (["--sweep", "SWEEP:- {name: Fast}\n- {name: fast, lag: 3}\n"], 2, "two configs are named 'Fast' and 'fast', one folder where case is ignored"),
        (["--sweep", "SWEEP:- {name: ../up}\n"], 2, "cannot be a folder name"),
        (["--sweep", "SWEEP:[1, 2"], 1, "malformed YAML"),
        (["--sweep", "SWEEP:[]"], 1, "no configs"),
        (["--sweep", "SWEEP:- 3\n"], 1, "expected a mapping"),
        (["--sweep", "missing.yaml"], 2, "cannot read the sweep file"),
    ],
)
def test_sweep_errors_are_one_line(run, tmp_path, capsys, args, code, needle):
    run_dir, base_dir = run
    if args[-1].startswith("SWEEP:"):
        (tmp_path / "s.yaml").write_text(args[-1][len("SWEEP:"):])
        args = [*args[:-1], tmp_path / "s.yaml"]
    got, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", *args, "-o", tmp_path / "o"], capsys)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "o").exists()
