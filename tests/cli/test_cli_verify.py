"""`bema-offline verify` through the real entry point: what it prints, and its exit codes."""

import json

import pytest
from hostile import run_cli
from synthetic import make_run

from bema_offline import BEMASchedule, average
from bema_offline.cli import cli


def verify_cli(*args):
    return run_cli(["verify", *map(str, args)], command=cli)


@pytest.fixture
def output(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4])
    average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), base_model=base_dir, save=("ema", "bema"))
    return tmp_path / "out"


def test_healthy_output(output):
    code, stdout, stderr = verify_cli(output, "--recompute", "2", "--seed", "7")
    assert code == 0 and stderr == ""
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"ok {output / 'bema'}", f"ok {output / 'ema'}"]
    for line in lines:
        assert "5 tensors in 1 shard, all finite" in line and "bema_offline.json matches" in line
        assert "shapes and dtypes match the sources (steps base, 2, 4)" in line
        assert "2 tensors recomputed bit for bit (--seed 7)" in line


def test_a_random_seed_is_printed(output):
    code, stdout, _ = verify_cli(output / "bema", "--recompute", "1")
    assert code == 0 and "1 tensor recomputed bit for bit (--seed " in stdout
    assert verify_cli(output / "bema", "-q") == (0, "", "")


def test_a_folder_without_provenance_says_what_was_not_checked(tmp_path):
    _, base_dir, _ = make_run(tmp_path, [2])
    code, stdout, stderr = verify_cli(base_dir)
    assert code == 0 and stderr == ""
    assert stdout == f"ok {base_dir}: 5 tensors in 1 shard, all finite; index and headers consistent; no bema_offline.json: provenance and sources not checked\n"


def test_damage_is_one_error_line_and_exit_code_1(output):
    record = json.loads((output / "ema" / "bema_offline.json").read_text())
    record["tensors"] = 4
    (output / "ema" / "bema_offline.json").write_text(json.dumps(record))
    code, stdout, stderr = verify_cli(output)
    assert code == 1 and stderr.count("\n") == 1
    assert stderr.startswith(f"error: {output / 'ema' / 'bema_offline.json'}: records 4 tensors")


def test_not_a_model_folder(tmp_path):
    code, _, stderr = verify_cli(tmp_path / "nope")
    assert code == 1 and stderr == f"error: {tmp_path / 'nope'}: no such folder\n"
    (tmp_path / "empty").mkdir()
    code, _, stderr = verify_cli(tmp_path / "empty")
    assert code == 1 and "is this a model folder?" in stderr


def test_leftovers_of_a_killed_run_are_pointed_out(output):
    stale = output.parent / ".out.bema-lock"
    stale.write_text("12345")
    code, _, stderr = verify_cli(output)
    assert code == 0 and f"note: {stale} was left by a killed run; delete it (rm -r {stale})" in stderr


def test_bad_options_are_usage_errors(output):
    code, _, stderr = verify_cli(output, "--recompute", "-1")
    assert code == 2 and stderr.startswith("error: ") and "--recompute" in stderr
    code, _, stderr = verify_cli(output, "--seed", "3")
    assert code == 2 and "--seed chooses the tensors of --recompute" in stderr
