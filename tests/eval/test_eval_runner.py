"""`evaluate`: the demo's ranking and numbers, a 2 × 2 grid against transformers' own loss, determinism, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from bema_offline.errors import DataError, UsageError
from bema_offline.eval import evaluate


def test_demo_baselines_rank_the_bema_above_the_last_checkpoint(demo) -> None:
    report = evaluate([demo.averaged], demo.heldout, baselines=True)
    by_label = {r.label: r for r in report.ranked}
    last = f"checkpoint-{demo.last_dir.name.split('-')[1]} (last)"
    assert set(by_label) == {"bema", "ema", "base", last}
    assert by_label["base"].candidate.source == str(demo.base_dir.resolve())
    assert by_label[last].candidate.source == str(demo.last_dir.resolve())
    # the demo's own numbers: its plain-torch model on the same held-out windows
    for label, name in [("bema", "bema"), ("ema", "ema"), ("base", "base"), (last, "last")]:
        assert by_label[label].metrics["loss"] == pytest.approx(demo.demo_losses[name], rel=1e-5, abs=1e-6)
        assert by_label[label].metrics["perplexity"] == pytest.approx(math.exp(by_label[label].metrics["loss"]))
    assert demo.demo_losses["bema"] < demo.demo_losses["last"]  # what the demo prints
    assert by_label["bema"].rank == 1 and by_label[last].rank == 2 and report.winner.label == "bema"
    assert report.data["rows"] == 16 and report.data["scored_tokens"] == 16 * 32


def _direct_losses(folder: Path, texts: list[str]) -> float:
    """transformers' own loss, one row at a time (no padding), summed over every predicted token in float64."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            total += model(input_ids=ids, labels=ids).loss.double().item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


def test_a_2x2_grid_ranks_and_scores_as_transformers_does(grid) -> None:
    texts = [json.loads(line)["text"] for line in grid.heldout.read_text().splitlines()]
    assert len({len(t.split()) for t in texts}) > 1  # rows of different lengths: the batches are padded
    report = evaluate([grid.sweep], grid.heldout, batch_size=5)
    expected = {name: _direct_losses(grid.sweep / name, texts) for name in grid.configs}
    assert [r.label for r in report.ranked] == sorted(expected, key=expected.get)
    for r in report.ranked:
        assert r.metrics["loss"] == pytest.approx(expected[r.label], rel=1e-5)
    assert report.swept == ["ema_power", "bias_power"] and report.sweep_dir == grid.sweep
    assert report.winner.label == min(expected, key=expected.get)
    assert report.ranked[0].candidate.record.params["ema_power"] in (0.3, 0.7)


def test_results_are_deterministic_and_do_not_depend_on_the_batches(grid) -> None:
    folder = grid.sweep / grid.configs[0]
    first = evaluate([folder], grid.heldout, batch_size=4).ranked[0].metrics
    again = evaluate([folder], grid.heldout, batch_size=4).ranked[0].metrics
    one_by_one = evaluate([folder], grid.heldout, batch_size=1).ranked[0].metrics
    assert first == again  # bit for bit
    assert one_by_one["loss"] == pytest.approx(first["loss"], rel=1e-6)


def test_bfloat16_stays_close_to_float32(grid) -> None:
    folder = grid.sweep / grid.configs[0]
    fp32 = evaluate([folder], grid.heldout).ranked[0].metrics["loss"]
    bf16 = evaluate([folder], grid.heldout, dtype="bfloat16").ranked[0].metrics["loss"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused(grid, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(grid.sweep / grid.configs[0], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors.pop("model.norm.weight")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"broken: its weights do not fit its config.json \(missing model.norm.weight\)"):
        evaluate([broken], grid.heldout)


def test_data_tokenized_for_another_vocabulary_is_refused(grid, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "the cat is red"}) + "\n")
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(grid.tokenizer_dir, tokenizer)
    vocab = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {word: index + 1000 for word, index in vocab["model"]["vocab"].items()}
    (tokenizer / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(DataError, match="the data's token ids go up to 10[0-9]+ but the model has [0-9]+ embeddings"):
        evaluate([grid.base_dir], big, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data": None}, "give --data (held-out data) or --lm-eval-tasks, or both"),
        ({"metric": "reward_accuracy"}, "--metric reward_accuracy: not a metric of this data (its metrics: loss, perplexity)"),
        ({"metric": "bleu"}, "--metric bleu: choose from loss, perplexity"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"dtype": "float16"}, "--dtype 'float16': choose float32 or bfloat16"),
        ({"device": "cuda"} if not torch.cuda.is_available() else {"device": "tpu"}, "--device"),
    ],
)
def test_bad_options_are_one_line_usage_errors(grid, kwargs: dict, message: str) -> None:
    arguments = {"data": grid.heldout, **kwargs}
    with pytest.raises(UsageError) as error:
        evaluate([grid.base_dir], arguments.pop("data"), **arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_preference_data_needs_a_reference(grid) -> None:
    with pytest.raises(UsageError, match="preference data needs a reference model: pass --ref-model"):
        evaluate([grid.base_dir], grid.prefs)


def test_the_default_reference_is_the_runs_theta0(grid) -> None:
    report = evaluate([grid.sweep / grid.configs[0]], grid.prefs)
    assert report.settings["reference"] == str(grid.base_dir.resolve())
    explicit = evaluate([grid.sweep / grid.configs[0]], grid.prefs, ref_model=grid.base_dir)
    assert report.ranked[0].metrics == explicit.ranked[0].metrics


def test_the_reference_among_the_baselines_is_scored_once(grid, monkeypatch) -> None:
    from bema_offline.eval import runner

    calls = []
    score = runner._score
    monkeypatch.setattr(runner, "_score", lambda source, *a, **k: calls.append(Path(source).resolve()) or score(source, *a, **k))
    report = evaluate([grid.sweep / grid.configs[0]], grid.prefs, baselines=True)
    assert calls == [grid.base_dir.resolve(), (grid.sweep / grid.configs[0]).resolve(), (grid.run_dir / "checkpoint-12").resolve()]
    base = next(r for r in report.ranked if r.label == "base")
    assert base.metrics["reward_accuracy"] == 0.0 and base.metrics["reward_margin"] == 0.0  # the reference against itself
