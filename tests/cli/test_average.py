"""`bema-average` end to end through the real entry point: outputs, dry run, and every error of the core issue."""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic import make_run

from bema_offline.cli import _run, average_command, cli


def run_cli(args, capsys, *, group=False):
    """Run the command as a user would; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        _run(cli if group else average_command, [str(a) for a in args], prog_name="bema-average")
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def run(tmp_path):
    run_dir, base_dir, weights = make_run(tmp_path, [2, 4, 6, 8])
    return run_dir, base_dir


def assert_clean_failure(code, err, expected_code, *needles, output=None):
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    # progress bars may precede it, but the error itself is one line, the last one
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if output is not None:
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}.bema-*")), "staging or lock left behind"


def test_writes_a_complete_model_folder(run, tmp_path, capsys):
    run_dir, base_dir = run
    before = tree_hash(tmp_path / "run"), tree_hash(base_dir)
    out = tmp_path / "out"
    code, stdout, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", out, "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "bema_offline.json", "config.json", "effective_weights.svg", "model.safetensors"]
    record = json.loads((out / "bema_offline.json").read_text())
    assert record["step"] == 8 and record["kind"] == "bema"
    assert record["schedule"]["update_freq"] == 2
    assert record["steps"]["update_steps_used"] == [2, 4, 6, 8]
    assert [w["source"] for w in record["effective_weights"]] == ["base", "checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert sum(w["weight"] for w in record["effective_weights"]) == pytest.approx(1.0)
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]  # a local path is not Hub metadata
    assert (tree_hash(tmp_path / "run"), tree_hash(base_dir)) == before
    assert not list(tmp_path.glob(".out.bema-*"))


def test_default_output_is_inside_the_run_and_inputs_are_untouched(run, capsys):
    run_dir, base_dir = run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, stdout, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2"], capsys)
    assert code == 0, err
    assert (run_dir / "bema-offline" / "model.safetensors").is_file()
    assert f"wrote {run_dir / 'bema-offline'}" in stdout
    assert all(p.read_bytes() == data for p, data in before.items())


def test_sharded_output_and_dtype(run, tmp_path, capsys):
    run_dir, base_dir = run
    out = tmp_path / "out"
    code, _, err = run_cli(
        [run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", out, "--max-shard-size", "600B", "--dtype", "bfloat16", "-q"],
        capsys,
    )
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    tensors = {}
    for shard in shards:
        tensors.update(load_file(out / shard))
    assert sorted(tensors) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_dry_run_prints_the_plan_and_writes_nothing(run, tmp_path, capsys):
    run_dir, base_dir = run
    out = tmp_path / "out"
    code, stdout, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "4", "-o", out, "--dry-run"], capsys)
    assert code == 0, err
    assert "checkpoints found: 4 (steps 2, 4, 6, 8)" in stdout
    assert "ignored (no weight in any output): 2, 6" in stdout
    assert "0.267261" in stdout  # β at step 4: (10 + 4)^-0.5
    assert "checkpoint-8 +" in stdout and "#" in stdout
    assert not out.exists()


def test_steps_and_every_update_write_step_folders(run, tmp_path, capsys):
    run_dir, base_dir = run
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", tmp_path / "a", "--steps", "4,8", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-4", "step-8"]
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", tmp_path / "b", "--every-update", "--no-bias-correction", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-2", "step-4", "step-6", "step-8"]
    assert json.loads((tmp_path / "b" / "step-4" / "bema_offline.json").read_text())["kind"] == "ema"


def test_allow_missing_skips_and_records(tmp_path, capsys):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 8])
    out = tmp_path / "out"
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", out], capsys)
    assert_clean_failure(code, err, 1, "update step", "6", "--allow-missing", output=out)
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", out, "--allow-missing"], capsys)
    assert code == 0
    assert "skipped 1 update step without a checkpoint: 6" in err
    assert json.loads((out / "bema_offline.json").read_text())["steps"]["update_steps_missing_skipped"] == [6]


# --- errors -----------------------------------------------------------------------------------------------


def test_no_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli([tmp_path / "empty", "-o", tmp_path / "out"], capsys)
    assert_clean_failure(code, err, 1, "no checkpoint-N folders", str(tmp_path / "empty"), output=tmp_path / "out")


def test_missing_theta0(run, tmp_path, capsys):
    run_dir, _ = run
    code, _, err = run_cli([run_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_clean_failure(code, err, 2, "--base-model", output=tmp_path / "out")
    code, _, err = run_cli([run_dir, "--update-freq", "2", "--update-after", "3", "-o", tmp_path / "out"], capsys)
    assert_clean_failure(code, err, 1, "checkpoint-3", "--update-after", output=tmp_path / "out")
    code, _, err = run_cli([run_dir, "--update-freq", "2", "--base-model", tmp_path / "nope", "-o", tmp_path / "out"], capsys)
    assert_clean_failure(code, err, 2, "--base-model", "nope", output=tmp_path / "out")


def test_update_after_uses_checkpoint_as_theta0(run, tmp_path, capsys):
    run_dir, _ = run
    code, _, err = run_cli([run_dir, "--update-freq", "2", "--update-after", "2", "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "bema_offline.json").read_text())
    assert record["steps"]["theta0"] == 2 and record["effective_weights"][0]["source"] == "checkpoint-2"


def rewrite(folder: Path, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda t: t.pop("model.norm.weight"), ["model.norm.weight", "missing", "step 4"]),
        (lambda t: t.update(extra=torch.zeros(2)), ["'extra'", "step 4"]),
        (lambda t: t.update({"model.norm.weight": torch.zeros(9)}), ["model.norm.weight", "shape", "step 4"]),
        (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].double()}), ["model.norm.weight", "F64", "step 4"]),
    ],
    ids=["missing-tensor", "extra-tensor", "shape", "dtype"],
)
def test_tensors_that_differ_across_steps(run, tmp_path, capsys, change, needles):
    run_dir, base_dir = run
    rewrite(run_dir / "checkpoint-4", change)
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_clean_failure(code, err, 1, *needles, output=tmp_path / "out")


def test_truncated_and_corrupt_files(run, tmp_path, capsys):
    run_dir, base_dir = run
    target = run_dir / "checkpoint-6" / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[:-10])
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_clean_failure(code, err, 1, str(target), "truncated", output=tmp_path / "out")
    target.write_bytes(struct.pack("<Q", 5) + b"{oops")
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", tmp_path / "out"], capsys)
    assert_clean_failure(code, err, 1, str(target), "malformed", output=tmp_path / "out")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_tensor_and_step(run, tmp_path, capsys, bad):
    run_dir, base_dir = run

    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 1] = bad

    rewrite(run_dir / "checkpoint-6", poison)
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", tmp_path / "out", "--max-memory", "4KiB"], capsys)
    assert_clean_failure(code, err, 1, "model.layers.0.mlp.up_proj.weight", "step 6", "NaN or Inf", output=tmp_path / "out")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--update-freq", "0"], "update_freq"),
        (["--ema-power", "-1"], "ema_power"),
        (["--bias-power", "-0.1"], "bias_power"),
        (["--lag", "-100", "--update-freq", "2"], "lag + multiplier*step"),
        (["--update-freq", "2", "--save", "foo"], "--save"),
        (["--update-freq", "2", "--max-memory", "lots"], "--max-memory"),
        (["--update-freq", "2", "--max-memory", "5iB"], "--max-memory '5iB': not a size"),
        (["--update-freq", "2", "--max-memory", "0"], "--max-memory 0: give a unit"),
        (["--update-freq", "2", "--max-memory", "0B"], "--max-memory 0B: at least 4096 bytes"),
        (["--update-freq", "2", "--max-memory", "1B"], "--max-memory 1B: at least 4096 bytes"),
        (["--update-freq", "2", "--max-memory", "512"], "--max-memory 512: give a unit, e.g. 512MiB"),
        (["--update-freq", "2", "--max-shard-size", "0"], "--max-shard-size 0: at least 1 bytes"),
        (["--update-freq", "1", "--lag", "0.5", "--multiplier", "0", "--bias-power", "2000"], "overflows"),
        (["--update-freq", "2", "--steps", "3"], "--steps 3"),
        (["--update-freq", "2", "--every-update", "--steps", "4"], "exclude"),
    ],
)
def test_invalid_parameters(run, tmp_path, capsys, args, needle):
    run_dir, base_dir = run
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "-o", tmp_path / "out", *args], capsys)
    assert_clean_failure(code, err, 2, needle, output=tmp_path / "out")


def test_existing_output_is_refused_unless_overwrite(run, tmp_path, capsys):
    run_dir, base_dir = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", out, "-q"]
    code, _, err = run_cli(args, capsys)
    assert_clean_failure(code, err, 2, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_may_not_replace_or_enter_an_input(run, capsys):
    run_dir, base_dir = run
    for out in (run_dir, run_dir / "checkpoint-4" / "avg", base_dir):
        code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", out, "--overwrite"], capsys)
        assert code == 2 and "input" in err
    assert (run_dir / "checkpoint-4" / "model.safetensors").is_file()


def test_failure_during_the_run_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    run_dir, base_dir = run
    from bema_offline.engine import engine

    def explode(self, *args):
        raise OSError(28, "No space left on device", "somefile")

    monkeypatch.setattr(engine.Engine, "_emit", explode)
    out = tmp_path / "out"
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "-o", out], capsys)
    assert_clean_failure(code, err, 1, "No space left on device", output=out)


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli([tmp_path / "empty", "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "error: " in err


def test_group_and_version(capsys):
    code, out, _ = run_cli(["--version"], capsys, group=True)
    assert code == 0 and "bema-offline" in out
    code, out, _ = run_cli(["average", "--help"], capsys, group=True)
    assert code == 0 and "Schedule (TRL's BEMACallback: bema, ema, dema, ouema):" in out and "Method (what to average" in out and "Performance:" in out


def test_a_path_that_is_not_utf8_gets_a_card_and_verifies(tmp_path, capsys):
    """A folder name holding a byte that is not UTF-8 (Linux allows it): the run writes its card and provenance
    (the card shows the byte escaped) and the output verifies against its sources."""

    from bema_offline.output.verify import verify

    root = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/r\xffun"))
    run_dir, base_dir, _ = make_run(root, [1, 2])
    code, _, err = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "1", "-q"], capsys)
    assert code == 0, err
    out = run_dir / "bema-offline"
    assert "\\udcff" in (out / "README.md").read_text(encoding="utf-8")
    assert verify(out, recompute=5, seed=0)[0].recomputed
