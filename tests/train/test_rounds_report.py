"""`bema_offline.train.rounds_report`: the rounds table and plot from a `rounds.json` record alone, with whatever
metrics came back (NaN included), and the records the first version of `iterate` wrote."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from bema_offline.train.rounds_report import (
    PLOT_FILE,
    TABLE_FILE,
    rounds_card,
    rounds_png,
    rounds_table,
    write_rounds_table,
)

ROLES = ("reference", "last checkpoint", "average")


def entry(k: int, workdir: Path, scores: dict[str, dict], **evaluation) -> dict:
    average = workdir / f"round-{k}-power-ema"
    reference = "base" if k == 1 else str(workdir / f"round-{k - 1}-power-ema")
    return {
        "round": k,
        "dataset": {"path": "data/prefs.jsonl"},
        "reference": {"path": reference, "fingerprint": f"r{k}"},
        "policy": {"path": reference, "fingerprint": f"r{k}"},
        "training": {"global_step": 4, "checkpoints": [2, 4], "last_checkpoint": {"path": str(workdir / f"round-{k}/checkpoint-4")}},
        "average": {"path": str(average), "label": "power-ema-sigma0.1", "kind": "power-ema"},
        "eval": {"key": {"data": "d"}, "scores": scores, **evaluation},
    }


def record(workdir: Path) -> dict:
    metrics = {"loss": {"higher_is_better": False, "description": "nll"}, "perplexity": {"higher_is_better": False, "description": "exp"}}
    rounds = [
        entry(k, workdir, {role: {"loss": 2.0 - k / 10 - i / 100, "perplexity": 7.0 - k - i} for i, role in enumerate(ROLES)},
              description="loss per token on 5 held-out text rows of t.jsonl", metrics=metrics)
        for k in (1, 2)
    ]  # fmt: skip
    rounds[1]["eval"]["scores"]["average"] = {"loss": "NaN", "perplexity": "Infinity"}  # as rounds.json holds them
    return {"plan": {"base_model": {"path": "base"}}, "rounds": rounds}


def test_a_row_per_round_and_model_and_a_column_per_metric(tmp_path: Path) -> None:
    text = rounds_table(record(tmp_path), tmp_path)
    assert "| 2 | round-1-power-ema | round-1-power-ema | prefs.jsonl | 4 | 2, 4 | round-2-power-ema |" in text
    assert "Evaluation: loss per token on 5 held-out text rows of t.jsonl (↑ higher is better, ↓ lower is better)" in text
    assert "| round | model | loss ↓ | perplexity ↓ |\n|---|---|---|---|\n| 1 | reference | 1.900000 | 6.000000 |" in text
    assert "| 1 | power-ema-sigma0.1 | 1.880000 | 4.000000 |" in text and "| 2 | power-ema-sigma0.1 | NaN | inf |" in text


def test_the_plot_has_a_panel_per_metric(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    many = record(tmp_path)
    for item in many["rounds"]:
        item["eval"]["metrics"].update({f"extra_{n}": {"higher_is_better": True, "description": ""} for n in range(3)})
        for role in ROLES:
            item["eval"]["scores"][role].update({f"extra_{n}": float(n) for n in range(3)})
    write_rounds_table(many, tmp_path)  # five metrics: two rows of panels
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![metrics per round]({PLOT_FILE})" in (tmp_path / TABLE_FILE).read_text()
    from matplotlib.image import imread

    assert imread(tmp_path / PLOT_FILE).shape[:2] == (700, 1260)  # 3 columns of 4.2 in, 2 rows of 3.2 in + the title
    single = copy.deepcopy(record(tmp_path))
    for item in single["rounds"]:
        for role in ROLES:
            item["eval"]["scores"][role] = {"loss": 1.0}
        item["eval"].pop("metrics")
    assert rounds_png(single, tmp_path / "one.png") and imread(tmp_path / "one.png").shape[:2] == (380, 420)


def test_records_of_the_first_version_still_render(tmp_path: Path) -> None:
    """Its rounds had no method label and a "metric" line instead of a description; a rerun evaluates them again."""
    first = record(tmp_path)
    for item in first["rounds"]:
        item["average"] = {"path": item["average"]["path"], "kind": "bema"}
        item["eval"] = {"metric": "held-out DPO reward against base", "scores": {role: {"reward_accuracy": 0.5} for role in ROLES}}
    text = rounds_table(first, tmp_path)
    assert "Evaluation: held-out DPO reward against base" in text and "| 2 | BEMA | 0.500000 |" in text
    card = rounds_card(first, tmp_path, repo_id="org/rounds")
    assert "the round's BEMA, made by" in card and 'revision="round-2"' in card


def test_only_rounds_evaluated_like_the_first_are_shown(tmp_path: Path) -> None:
    """A rerun with other eval data evaluates round 1 first; until it reaches round 2, round 2's old scores stay out."""
    mixed = record(tmp_path)
    mixed["rounds"][1]["eval"]["key"] = {"data": "older"}
    text = rounds_table(mixed, tmp_path)
    assert "| 1 | reference |" in text and "| 2 | reference |" not in text


def test_lora_rounds_say_so_above_the_table(tmp_path: Path) -> None:
    lora = record(tmp_path)
    lora["plan"]["lora"] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": None, "use_rslora": True}
    title = rounds_table(lora, tmp_path).splitlines()[0]
    assert title.endswith(
        "; each round trains a LoRA adapter, r=16, lora_alpha=32, lora_dropout=0.05, target_modules=peft's default, "
        "use_rslora=True, merged into the round's models)"
    )
    lora["plan"]["lora"]["target_modules"] = ["q_proj", "v_proj"]
    assert "target_modules=q_proj,v_proj, use_rslora=True" in rounds_table(lora, tmp_path)
    assert "LoRA" not in rounds_table(record(tmp_path), tmp_path)
