"""The model card and what it says: metadata, tables, steps, the weights chart, the load snippet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from synthetic import make_run

from bema_offline import BEMASchedule, average
from bema_offline.methods.windows import Uniform
from bema_offline.output.card import write_card
from bema_offline.output.chart import CHART_SVG
from bema_offline.sources.runinfo import detect_training


def _average(tmp_path: Path, steps: list[int], **kwargs) -> Path:
    run_dir, base_dir, _ = make_run(tmp_path, steps)
    out = tmp_path / "out"
    kwargs.setdefault("schedule", BEMASchedule(update_freq=2))
    average(run_dir, out, base_model=base_dir, **kwargs)
    return out


def test_card_round_trips_with_metadata_tables_and_chart(tmp_path: Path) -> None:
    out = _average(tmp_path, [2, 4, 6])
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["tags"][:2] == ["bema", "bema-offline"]
    assert "base_model" not in data  # a local base folder is not a Hub id
    record = json.loads((out / "bema_offline.json").read_text())
    # parameter table: every schedule parameter with its value
    for name, value in record["schedule"].items():
        assert f"| {name} | `{value}` |" in card.text
    # steps and effective weights as a table, matching the provenance
    assert "- Update steps used: 2, 4, 6" in card.text
    assert "- Update steps skipped (no checkpoint): none" in card.text
    for entry in record["effective_weights"]:
        assert f"| {entry['source']} | {entry['step']} | {entry['weight']:+.6f} |" in card.text
    assert 'from_pretrained("path/to/this/folder")' in card.text
    # every card shows its chart, an SVG written beside it (no matplotlib), and the same numbers as text
    assert f"]({CHART_SVG})" in card.text and "checkpoint-6 +" in card.text
    assert (out / CHART_SVG).read_text().startswith("<svg")


def test_card_names_skipped_steps(tmp_path: Path) -> None:
    out = _average(tmp_path, [2, 6], allow_missing=True)
    card = ModelCard.load(out / "README.md")
    assert "- Update steps used: 2, 6" in card.text
    assert "- Update steps skipped (no checkpoint): 4" in card.text


def test_card_reads_method_and_base_model_from_the_run_card(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4])
    (run_dir / "README.md").write_text(
        "---\nbase_model: Qwen/Qwen2.5-0.5B\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n- sft\n- trl\n---\n# run\n"
    )
    average(run_dir, tmp_path / "out", schedule=BEMASchedule(update_freq=2), base_model=base_dir)
    data = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()
    assert data["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert data["tags"] == ["bema", "bema-offline", "trl", "sft"]


def test_hub_base_model_id_goes_to_the_metadata(tmp_path: Path) -> None:
    out = _average(tmp_path, [2, 4])
    record = json.loads((out / "bema_offline.json").read_text())
    record["base_model"] = record["base_model_id"] = "Qwen/Qwen2.5-0.5B"
    write_card(out, record, repo_id="my-org/avg", revision="step-4")
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert 'from_pretrained("my-org/avg", revision="step-4")' in card.text


def test_the_card_needs_no_matplotlib(tmp_path: Path, monkeypatch) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(__import__("sys").modules, module, None)
    out = _average(tmp_path, [2, 4])
    write_card(out, json.loads((out / "bema_offline.json").read_text()))
    assert (out / CHART_SVG).exists() and f"]({CHART_SVG})" in (out / "README.md").read_text()


def test_a_weighted_method_s_card_names_the_method_its_parameters_and_sources(tmp_path: Path) -> None:
    out = _average(tmp_path, [2, 4, 6, 8], schedule=Uniform(last=2))
    record = json.loads((out / "bema_offline.json").read_text())
    assert record["kind"] == "uniform" and record["method"] == {"method": "uniform", "last": 2, "window": None}
    assert record["schedule"] is None and record["steps"]["used"] == [6, 8]
    card = ModelCard.load(out / "README.md")
    assert card.text.startswith("\n# Uniform average of `run` at step 8")
    assert "uniform average of the last 2 checkpoints" in card.text
    assert "| last | `2` |" in card.text and "- Sources used: 6, 8" in card.text
    assert "| checkpoint-6 | 6 | +0.500000 |" in card.text and "| checkpoint-8 | 8 | +0.500000 |" in card.text


def test_in_a_sweep_each_card_names_the_checkpoints_its_own_output_did_not_use(tmp_path: Path) -> None:
    out = _average(tmp_path, [2, 4, 6, 8], schedule=[("last2", Uniform(last=2)), ("all", Uniform())])
    last2 = json.loads((out / "last2" / "bema_offline.json").read_text())
    assert last2["steps"]["used"] == [6, 8] and last2["steps"]["ignored"] == [2, 4]  # though "all" read them
    assert "- Checkpoints not used: 2, 4" in ModelCard.load(out / "last2" / "README.md").text
    assert json.loads((out / "all" / "bema_offline.json").read_text())["steps"]["ignored"] == []


@pytest.mark.parametrize(
    "metrics, method",
    [
        ({"loss", "rewards/margins", "logps/chosen", "mean_token_accuracy"}, "dpo"),
        ({"loss", "mean_token_accuracy", "num_tokens"}, "sft"),
        ({"loss", "kl", "rewards/chosen", "rewards/margins", "logps/chosen"}, "kto"),
        ({"loss", "log_odds_ratio", "nll_loss", "rewards/margins", "logps/chosen"}, "orpo"),
        ({"loss", "nll_loss", "rewards/margins", "logps/chosen"}, "cpo"),
        ({"loss", "grad_norm", "learning_rate"}, None),
    ],
)
def test_method_from_trainer_state_metrics(tmp_path: Path, metrics: set[str], method: str | None) -> None:
    checkpoint = tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    history = [{key: 0.0 for key in metrics} | {"step": 4}]
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": history}))
    info = detect_training(tmp_path / "run", [checkpoint])
    assert info.method == method
    assert info.tags == (["trl", method] if method else [])


def test_a_malformed_run_card_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\n: : not yaml [\n---\n")
    assert detect_training(tmp_path, []).method is None


def test_card_metadata_round_trips_through_yaml_whatever_the_strings() -> None:
    """The front matter is written without a YAML library: tags that YAML would misread unquoted (a colon, `yes`,
    `null`, a number, quotes, unicode) come back as the same strings, and the Hub's own parser agrees."""
    import yaml
    from huggingface_hub import ModelCard

    from bema_offline.output.card import metadata_yaml

    metadata = {"base_model": "org/model: v2", "library_name": "transformers",
                "tags": ["bema", "yes", "null", "1e3", 'say "hi"', "back\\slash", "ünï", "0x/\U00020000", "- dash", "#hash"]}  # fmt: skip
    assert yaml.safe_load(metadata_yaml(metadata)) == metadata
    assert ModelCard(f"---\n{metadata_yaml(metadata)}\n---\nbody").data.to_dict() == metadata
