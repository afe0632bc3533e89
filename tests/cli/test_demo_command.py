"""`bema-offline demo`: the README's first command."""

import json

from cli.test_average import run_cli


def test_demo_trains_averages_and_reports(tmp_path, capsys):
    workdir = tmp_path / "demo"
    code, out, err = run_cli(["demo", "--workdir", workdir, "--steps", "60", "--save-every", "20"], capsys, group=True)
    assert code == 0, err
    assert sorted(p.name for p in (workdir / "run").iterdir()) == ["base", "checkpoint-20", "checkpoint-40", "checkpoint-60"]
    for kind in ("ema", "bema"):
        record = json.loads((workdir / "averaged" / kind / "bema_offline.json").read_text())
        assert record["kind"] == kind and record["step"] == 60
    assert "held-out loss:" in out and "BEMA at step 60" in out and "checkpoint-60 +" in out
    assert "\r" not in out + err and "\x1b" not in out + err  # no progress bars when the output is not a terminal
    # a second demo replaces the first; anything else at --workdir is refused
    code, _, err = run_cli(["demo", "--workdir", workdir, "--steps", "20", "--save-every", "20", "-q"], capsys, group=True)
    assert code == 0, err
    other = tmp_path / "mine"
    other.mkdir()
    code, _, err = run_cli(["demo", "--workdir", other, "-q"], capsys, group=True)
    assert code == 2 and "is not a previous demo" in err


def test_demo_options_that_would_save_no_checkpoint_are_usage_errors(tmp_path, capsys):
    for options, message in (
        (["--save-every", "0"], "--save-every"),
        (["--steps", "5", "--save-every", "20"], "--steps 5 is fewer than --save-every 20"),
    ):
        code, out, err = run_cli(["demo", "--workdir", tmp_path / "demo", *options], capsys, group=True)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "demo").exists()
