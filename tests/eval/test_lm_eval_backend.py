"""The lm-evaluation-harness backend: a local task YAML on local data, through lm_eval's own API, checked against a
direct computation of the same multiple-choice accuracy with transformers. Nothing is downloaded."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from eval_runs import ANIMALS, COLORS
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from bema_offline.errors import UsageError
from bema_offline.eval import LmEvalSettings, evaluate

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'bema-offline[eval]')")
from bema_offline.eval import lm_eval_backend  # noqa: E402

TASK = "bema_tiny_colors"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_task")
    rng = random.Random(3)
    docs = []
    for _ in range(10):
        choices = rng.sample(COLORS, 3)
        docs.append({"question": f"the {rng.choice(ANIMALS)} is", "choices": choices, "answer": rng.randrange(3)})
    (root / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (root / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _direct_accuracy(folder: Path, docs: list[dict]) -> float:
    """For each document, the choice with the largest log-likelihood after the question (" " + choice), as
    lm-eval's multiple_choice defines it, computed here with transformers alone."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    right = 0
    with torch.no_grad():
        for doc in docs:
            context = tokenizer(doc["question"])["input_ids"]
            scores = []
            for choice in doc["choices"]:
                ids = tokenizer(doc["question"] + " " + choice)["input_ids"]
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
            right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


def test_a_local_task_runs_through_lm_eval_on_every_model(grid, task_dir: Path) -> None:
    settings = LmEvalSettings(tasks=[TASK], include_path=str(task_dir))
    models = [grid.base_dir, grid.run_dir / "checkpoint-12"]
    report = evaluate(models, lm_eval=settings)
    assert report.metric == f"{TASK}/acc" and report.higher_is_better
    docs = [json.loads(line) for line in (task_dir / "docs.jsonl").read_text().splitlines()]
    for r in report.ranked:
        assert r.metrics[f"{TASK}/acc"] == pytest.approx(_direct_accuracy(Path(r.candidate.source), docs), abs=1e-9)
    assert report.settings["lm_eval"]["tasks"] == [TASK]


def test_lm_eval_beside_held_out_data(grid, task_dir: Path) -> None:
    settings = LmEvalSettings(tasks=[TASK], include_path=str(task_dir), limit=4)
    report = evaluate([grid.base_dir], grid.heldout, lm_eval=settings, metric=f"{TASK}/acc")
    assert set(report.ranked[0].metrics) == {"loss", "perplexity", f"{TASK}/acc"}
    with pytest.raises(UsageError, match=rf"--metric {TASK}/f1: not among the metrics computed \(loss, perplexity, {TASK}/acc\)"):
        evaluate([grid.base_dir], grid.heldout, lm_eval=settings, metric=f"{TASK}/f1")


def test_an_unknown_task_is_named_with_the_closest(task_dir: Path, monkeypatch) -> None:
    local = lm_eval_backend.task_manager([TASK], include_path=str(task_dir))
    monkeypatch.setitem(lm_eval_backend._task_managers, (str(task_dir), True), local)  # skip indexing lm-eval's own tasks
    with pytest.raises(UsageError, match=f"--lm-eval-tasks bema_tiny_color: lm-eval has no such task; did you mean {TASK}"):
        lm_eval_backend.check_lm_eval(["bema_tiny_color"], include_path=str(task_dir))


def test_without_lm_eval_the_extra_is_named(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(lm_eval_backend.MissingLmEvalError, match=r"pip install 'bema-offline\[eval\]'"):
        lm_eval_backend.require_lm_eval()
