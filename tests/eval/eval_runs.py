"""Tiny real runs for the evaluation tests, each built once per test session (the builders memoize).

- `demo_sweep`: the demo's run (`make_demo_run`, its defaults), its EMA and BEMA, and its held-out text as JSONL.
- `grid_sweep`: a tiny Llama fine-tuned with `transformers.Trainer` (a checkpoint every 3 steps), averaged with a
  2 × 2 grid of BEMA schedules by `bema_offline.average`, with held-out text and preference data.

`tests/cli/test_eval_command.py` imports this module too, so the runs are shared by both folders' tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tiny_dpo import make_preference_dataset, make_tiny_llama, make_tokenizer

from bema_offline import BEMASchedule, average
from bema_offline.eval.candidates import Candidate
from bema_offline.eval.metrics import METRICS
from bema_offline.eval.record import OutputRecord
from bema_offline.eval.report import Result
from bema_offline.methods.sweep import parse_grid

_built: dict[str, object] = {}

ANIMALS = "cat dog bird fish horse cow sheep mouse lion tiger bear wolf fox rabbit duck goat".split()
COLORS = "red blue green yellow black white orange purple brown gray pink".split()
GRID = ["ema_power=0.3,0.7", "bias_power=0.1,0.4"]


@dataclass(frozen=True)
class DemoSweep:
    run_dir: Path
    base_dir: Path
    last_dir: Path
    averaged: Path  # holds ema/ and bema/
    heldout: Path  # JSONL, one "text" row per held-out window of the demo
    demo_losses: dict[str, float]  # the demo's own held-out loss of base, last, ema, bema


@dataclass(frozen=True)
class GridSweep:
    root: Path
    tokenizer_dir: Path
    base_dir: Path
    run_dir: Path
    sweep: Path  # one folder per config of GRID
    configs: list[str]
    heldout: Path  # JSONL with a "text" column
    prefs: Path  # JSONL preference data (standard format)
    chat_prefs: Path  # JSONL preference data (conversational format)


def demo_sweep(tmp_path_factory) -> DemoSweep:
    if "demo" not in _built:
        from bema_offline.train.demo import VOCAB, _heldout_windows, heldout_loss, make_demo_run

        root = tmp_path_factory.mktemp("eval_demo")
        demo = make_demo_run(root / "run")
        averaged = root / "averaged"
        average(demo.run_dir, averaged, schedule=BEMASchedule(update_freq=demo.save_every), base_model=demo.base_dir,
                save=("ema", "bema"))
        heldout = root / "heldout.jsonl"
        # the demo's held-out windows as text: one character is one token, and the tokenizer adds no special token
        rows = ["".join(VOCAB[i] for i in window.tolist()) for window in _heldout_windows()]
        heldout.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
        last = demo.checkpoint_dirs[-1]
        losses = {name: heldout_loss(folder) for name, folder in
                  [("base", demo.base_dir), ("last", last), ("ema", averaged / "ema"), ("bema", averaged / "bema")]}
        _built["demo"] = DemoSweep(demo.run_dir, demo.base_dir, last, averaged, heldout, losses)
    return _built["demo"]


def grid_sweep(tmp_path_factory) -> GridSweep:
    if "grid" not in _built:
        root = tmp_path_factory.mktemp("eval_grid")
        tokenizer = make_tokenizer(root / "tokenizer")
        make_tiny_llama(root / "base", tokenizer, seed=0)
        _train(root / "base", root / "run", tokenizer)
        configs = parse_grid(GRID, base=BEMASchedule(update_freq=3))
        average(root / "run", root / "sweep", schedule=configs, base_model=root / "base")
        heldout = root / "heldout.jsonl"
        heldout.write_text("".join(json.dumps({"text": text}) + "\n" for text in _sentences(24, seed=99)))
        prefs, chat_prefs = root / "prefs.jsonl", root / "chat_prefs.jsonl"
        make_preference_dataset(12, seed=5).to_json(prefs)
        make_preference_dataset(12, seed=6, conversational=True).to_json(chat_prefs)
        _built["grid"] = GridSweep(root, root / "tokenizer", root / "base", root / "run", root / "sweep",
                                   [name for name, _ in configs], heldout, prefs, chat_prefs)
    return _built["grid"]


def _sentences(count: int, *, seed: int) -> list[str]:
    """Sentences of one to three clauses with a pattern a tiny model learns in a few steps (`the cat is red and the
    dog is blue`); their lengths differ, so that batches need padding."""
    rng = random.Random(seed)
    clauses = lambda: [f"the {rng.choice(ANIMALS)} is {rng.choice(COLORS)}" for _ in range(rng.randint(1, 3))]  # noqa: E731
    return [" and ".join(clauses()) for _ in range(count)]


def _train(base_dir: Path, run_dir: Path, tokenizer) -> None:
    """12 steps of causal LM fine-tuning with transformers' Trainer, fp32 on the CPU, a checkpoint every 3 steps."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM, Trainer, TrainingArguments

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    texts = _sentences(96, seed=1)
    dataset = Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=12, save_steps=3, save_strategy="steps", save_only_model=True,
        per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, use_cpu=True, report_to=[], logging_steps=100, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer).train()
    finally:
        torch.set_num_threads(threads)


DIRECTIONS = {name: metric.higher_is_better for name, metric in METRICS.items()}


def fake_result(label: str, role: str = "average", params: dict | None = None, **metrics: float) -> Result:
    """A result without a model: `role` "average" gets a provenance record with `params` as its schedule."""
    record = None
    if role == "average":
        raw = {"config": label, "kind": "bema", "step": 12, "schedule": params or {},
               "effective_weights": [{"step": 0, "weight": -0.5}, {"step": 12, "weight": 1.5}], "unknown": [1, 2]}
        record = OutputRecord(Path("/runs") / label, raw)
    return Result(Candidate(label, f"/runs/{label}", role, record), metrics)
