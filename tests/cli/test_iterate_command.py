"""`bema-offline iterate` run like the entry point: a plan from a YAML file with the command line winning (a method of
bema-average as the reference, with its options), one-line errors for bad plans and methods, and the help texts (the
group's, `dpo`'s, `bema-average --version`)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from run_entry import run_cli
from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer

from bema_offline import __version__
from bema_offline.cli import average_entry, cli

FAST = ["gradient_checkpointing=false", "use_cpu=true", "max_length=32", "report_to=none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_iterate")
    make_tiny_llama(root / "base", make_tokenizer(root / "tokenizer"))
    make_preference_dataset(6, seed=3).to_json(root / "prefs.jsonl")
    return root


@pytest.fixture(autouse=True)
def fast(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_plan_from_a_file_with_the_command_line_winning(data: Path, tmp_path: Path, capsys) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    config = plans / "rounds.yaml"
    config.write_text(
        f"base_model: {data / 'base'}\n"
        f"dataset: {data / 'prefs.jsonl'}\n"
        "rounds: 3\n"
        "workdir: ../work   # relative to this file\n"
        "save-steps: 1\n"
        "max_steps: 2\n"
        "learning_rate: 0.001\n"
        "per_device_train_batch_size: 2\n"
        "bf16: false\n"
        "beta: 0.5\n"
        "reference: uniform\n"
        "window: 2:4   # not YAML 1.1's 2·60 + 4\n"
        "config_set: {gradient_checkpointing: false, use_cpu: true, max_length: 32, report_to: none}\n"
    )
    code, out, err = run_cli(cli, ["iterate", "--config", config, "--rounds", 1, "--beta", 0.2], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "work" / "rounds.json").read_text())
    assert len(record["rounds"]) == 1 and record["plan"]["dpo"]["beta"] == 0.2  # the command line won
    assert record["plan"]["dpo"]["overrides"]["max_length"] == 32 and record["plan"]["dpo"]["save_steps"] == 1
    assert record["rounds"][0]["training"]["checkpoints"] == [1, 2]
    assert record["plan"]["average"] == {"method": "uniform", "last": None, "window": "2:4"}  # --window's A:B, from the file
    assert record["rounds"][0]["average"]["effective_weights"] == {"2": 1.0}
    assert f"round 1/1: training: policy {data / 'base'}, reference {data / 'base'}" in out
    assert "| 1 | base | base | prefs.jsonl | 2 | 1, 2 | round-1-uniform |" in out
    assert "\r" not in err and "\x1b" not in err  # no progress bars when stderr is not a terminal
    # the same plan again does nothing but check; the file's 3 rounds would extend it, a new beta is refused
    code, out, err = run_cli(cli, ["iterate", "--config", config, "--rounds", 1, "--beta", 0.2, "-q"], capsys)
    assert (code, out, err) == (0, "", "")
    code, _, err = run_cli(cli, ["iterate", "--config", config, "--rounds", 1, "-q"], capsys)
    assert code == 2 and err == (
        f"error: --workdir {plans / '..' / 'work'} holds a run with another plan: --beta was 0.2, now 0.5; "
        "rerun with the options of that run, or use a new --workdir\n"
    )
    code, _, err = run_cli(cli, ["iterate", "--config", config, "--rounds", 1, "--beta", 0.2, "--window", "1:2"], capsys)
    assert code == 2 and "another plan: --window was 2:4, now 1:2; rerun" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds: 2\nlearning_reate: 0.1\n", "unknown key 'learning_reate'; did you mean learning_rate?"),
        ("quiet: true\n", "unknown key 'quiet'; the keys are the options' names: base_model, dataset,"),
        ("base_model: &b ./base\nworkdir: *b\n", "line 2 uses a YAML alias (*b); write each value out in full"),
        ("rounds: 2\nrounds: 3\n", "line 1: key 'rounds' is given twice"),
        ("rounds: many\n", "rounds: 'many' is not a valid integer range."),
        ("reference: best\n", "reference: 'best' is not one of 'bema', 'ema', 'last', 'base', 'dema', 'ouema', 'uniform', 'power-ema', 'wsm', 'expo'."),
        ("- rounds: 2\n", "expected a mapping of option names to values, got a list"),
        ("rounds: [2\n", "malformed YAML (while parsing a flow sequence)"),
        ("base_model: [a, b]\n", "base_model: ['a', 'b'] is not a value of --base-model"),
        ("rounds: [1]\n", "rounds: [1] is not a value of --rounds"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path: Path, capsys, text: str, message: str) -> None:
    config = tmp_path / "rounds.yaml"
    config.write_text(text)
    code, out, err = run_cli(cli, ["iterate", "--config", config], capsys)
    assert code == 2 and err.count("\n") == 1 and out == ""
    assert err.startswith(f"error: --config {config}") and message in err
    assert list(tmp_path.iterdir()) == [config]


def test_missing_and_inconsistent_options_are_one_line(data: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(cli, ["iterate", "--rounds", 2], capsys)
    assert code == 2 and err == "error: --base-model, --dataset, --workdir, --save-steps: required, on the command line or in --config (see --help)\n"
    args = ["iterate", "--base-model", data / "base", "--dataset", data / "prefs.jsonl", "--rounds", 2, "--save-steps", 2,
            "--workdir", tmp_path / "work"]  # fmt: skip
    code, _, err = run_cli(cli, [*args, "--private"], capsys)
    assert code == 2 and err == "error: --private needs --push-to-hub ORG/NAME (see --help)\n"
    code, _, err = run_cli(cli, [*args, "--config-set", "save_only_model=true"], capsys)
    assert code == 2 and err.startswith("error: --config-set save_only_model: not allowed, iterate keeps the optimizer state")
    code, _, err = run_cli(cli, [*args, "--push-to-hub", "no-slash"], capsys)
    assert code == 2 and "write it as ORG/NAME" in err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--reference", "uniform", "--ema-power", 0.3], "--ema-power does not apply to --reference uniform (it takes --last, --window)"),
        (["--reference", "power-ema"], "power-ema needs --sigma-rel"),
        (["--reference", "ema", "--half-life", 50, "--lag", 3], "--lag does not apply to --reference ema (it takes --half-life)"),
        (["--reference", "base", "--last", 2], "--reference base averages each round with bema: last does not apply to bema; bema takes the schedule options"),
        (["--update-freq", 3], "--update-freq 3: the update steps must be saved checkpoints, and each round saves one every --save-steps 2 steps; use a multiple of 2"),
        (["--update-after", 1, "--reference", "dema"], "--update-after 1: θ0 would be checkpoint-1, which no round saves"),
        (["--reference", "expo", "--alpha", 0.5, "--ref-step", 3], "--ref-step 3: no round saves checkpoint-3 (one every --save-steps 2 steps); use a multiple of 2"),
        (["--reference", "wsm", "--decay", "cosine", "--last", 3, "--max-steps", 4],
         "--reference wsm: each round saves checkpoints 2, 4 (--save-steps 2, --max-steps 4), and wsm: last 3 checkpoints asked for, but there are 2"),
    ],
)
def test_methods_the_rounds_cannot_average_are_one_line(data: Path, tmp_path: Path, capsys, options: list, message: str) -> None:
    """Refused before anything trains: an option the method does not take, one it needs, or an average that the
    rounds' checkpoints could not give."""
    args = ["iterate", "--base-model", data / "base", "--dataset", data / "prefs.jsonl", "--rounds", 2, "--save-steps", 2,
            "--workdir", tmp_path / "work", *options]  # fmt: skip
    code, out, err = run_cli(cli, args, capsys)
    assert (code, out) == (2, "") and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "work").exists()


def test_help_texts(capsys) -> None:
    code, out, _ = run_cli(cli, ["--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "bema-average is a shortcut for bema-offline average." in text
    assert "bema-offline demo # a tiny training run" in text  # an example
    # whole descriptions, not click's first sentence cut at 45 characters
    assert "iterate Run K rounds of DPO with TRL: round k+1 trains against an average (BEMA by default) of round k's checkpoints." in text
    commands = out.split("Commands:")[1].split("bema-average is")[0]
    assert not any(line.rstrip().endswith("...") for line in commands.splitlines())
    code, out, _ = run_cli(cli, ["iterate", "--help"], capsys)
    assert code == 0 and "Run the same command again to resume a killed run." in out
    assert all(section in out for section in ("Plan:", "Training (TRL's DPOConfig):", "LoRA (peft's LoraConfig", "Method (what", "Schedule (", "Evaluation:", "Hub:"))
    assert "--lora-r R" in out and "--lora-set KEY=VALUE" in out
    assert "--reference METHOD|last|base" in out and "--sigma-rel X" in out and "--method" not in out
    code, out, _ = run_cli(cli, ["dpo", "--help"], capsys)
    assert "bema-offline iterate --rounds K" in out and "scripts/" not in out


def test_bema_average_version(capsys) -> None:
    code, out, _ = run_cli(average_entry, ["--version"], capsys)
    assert code == 0 and out.startswith(f"bema-average {__version__} (EMA kernel: ")
    code, out, _ = run_cli(cli, ["average", "--help"], capsys)
    assert "--version" not in out  # the group's own average command is unchanged


def test_the_command_offers_what_the_plan_takes() -> None:
    """The command keeps its own copy of the choices, so that `--help` imports neither torch nor trl."""
    from bema_offline.cli import iterate as command
    from bema_offline.train import rounds_plan

    assert command.REFERENCES == rounds_plan.REFERENCES and command.POLICY_INITS == rounds_plan.POLICY_INITS


def test_lora_rounds_from_the_command_line_and_a_file(data: Path, tmp_path: Path, capsys) -> None:
    """The --lora-* options of `dpo`, from the command line and a --config file (lora_set as a mapping), train an
    adapter each round; the plan records them, and a changed one is refused with one line."""
    config = tmp_path / "rounds.yaml"
    config.write_text("lora_r: 2\nlora_target_modules: q_proj,v_proj\nlora_set: {use_rslora: true}\n")
    args = ["iterate", "--config", config, "--base-model", data / "base", "--dataset", data / "prefs.jsonl", "--rounds", 1,
            "--save-steps", 2, "--max-steps", 2, "--per-device-train-batch-size", 2, "--no-bf16", "--workdir", tmp_path / "work",
            *[a for pair in FAST for a in ("--config-set", pair)]]  # fmt: skip
    code, out, err = run_cli(cli, [*args, "--lora-alpha", 4], capsys)
    assert code == 0, err
    adapter = json.loads((tmp_path / "work" / "round-1" / "checkpoint-2" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["use_rslora"], sorted(adapter["target_modules"])) == (2, 4, True, ["q_proj", "v_proj"])
    record = json.loads((tmp_path / "work" / "rounds.json").read_text())
    assert record["plan"]["lora"] == {"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "use_rslora": True}
    assert (tmp_path / "work" / "round-1-bema" / "model.safetensors").is_file()
    assert "round 1/1: averaging the adapters of" in out and "each round trains a LoRA adapter, r=2, lora_alpha=4.0" in out
    code, _, err = run_cli(cli, [*args, "--lora-alpha", 4, "--lora-r", 3], capsys)
    assert code == 2 and err.startswith("error: --workdir") and "another plan: --lora-r was 2, now 3; rerun" in err and err.count("\n") == 1
    code, _, err = run_cli(cli, ["iterate", *args[3:], "--lora-alpha", 4], capsys)  # without the file's --lora-r
    assert code == 2 and err == "error: --lora-alpha, --lora-dropout, --lora-target-modules and --lora-set configure the adapter that --lora-r asks for; add --lora-r (see --help)\n"


def test_a_stopped_iterate_or_dpo_says_what_it_leaves_not_nothing_written() -> None:
    from bema_offline.cli import _left_behind, average_entry

    assert "run the same command again to resume" in _left_behind(cli, ["iterate", "--workdir", "w"])
    assert "stay in --output-dir" in _left_behind(cli, ["--debug", "dpo"])
    assert _left_behind(cli, ["average", "run"]) == _left_behind(average_entry, ["run"]) == "nothing was written"
