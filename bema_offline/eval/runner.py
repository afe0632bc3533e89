"""Evaluate models one at a time on the same data, and rank them: the library behind `bema-offline eval`.

Only one model is in memory at a time (the DPO reference is scored first, and only its sums are kept), so memory is
one model plus one batch's activations. The data is tokenized once, with one tokenizer, for every model. transformers
is imported when a model is loaded.
"""

from __future__ import annotations

import gc
import json
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.engine import check_device
from ..errors import DataError, UsageError, first_line
from .candidates import Candidate, find_candidates
from .data import load_eval_data
from .metrics import DEFAULT_METRIC, METRICS, METRICS_OF_KIND, loss_metrics, preference_metrics
from .report import EvalReport, Result, rank
from .sequences import PreparedData, prepare

if TYPE_CHECKING:  # scoring imports torch
    from .scoring import SequenceScores

DTYPES = ("float32", "bfloat16")
DEFAULT_BETA = 0.1  # TRL's DPOConfig.beta


@dataclass(frozen=True)
class LmEvalSettings:
    """The lm-evaluation-harness tasks to run on every model (see `bema_offline.eval.lm_eval_backend`).

    Args:
        tasks (`list[str]`): task names, built in or from `include_path`.
        include_path (`str`, *optional*): a folder of task YAML files.
        limit (`int`, *optional*): at most this many documents per task.
        num_fewshot (`int`, *optional*): few-shot examples per prompt; default: each task's own.
    """

    tasks: list[str]
    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None


def evaluate(
    models: Sequence[str | Path],
    data: str | Path | None = None,
    *,
    baselines: bool = False,
    metric: str | None = None,
    ref_model: str | Path | None = None,
    beta: float = DEFAULT_BETA,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    max_length: int | None = None,
    tokenizer: str | Path | None = None,
    lm_eval: LmEvalSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate model folders (or a sweep's outputs) on held-out data and rank them.

    Args:
        models (`Sequence[str | Path]`): model folders, or sweep folders whose model subfolders are evaluated.
        data (`str | Path`, *optional*): JSONL / JSON / Parquet or a saved `datasets` folder; its columns decide the
            metrics (see `bema_offline.eval.data`). Needed unless `lm_eval` is given.
        baselines (`bool`, defaults to False): also evaluate the run's base model and newest checkpoint.
        metric (`str`, *optional*): the metric to rank by; default: loss, or reward_accuracy for preference data, or
            the first lm-eval task's first metric without `data`.
        ref_model (`str | Path`, *optional*): the DPO reference for preference data; default: the run's θ0 from the
            provenance records (the base model, or `checkpoint-τ` when `update_after` = τ > 0).
        beta (`float`, defaults to 0.1): DPO's β for the implicit rewards (TRL's default).
        device (`str`, defaults to "cpu"): "cpu", "cuda" or "cuda:N".
        dtype (`str`, defaults to "float32"): "float32" or "bfloat16", the dtype models are loaded in.
        batch_size (`int`, defaults to 8): sequences per forward pass.
        max_length (`int`, *optional*): longest sequence in tokens (longer ones keep their start); default: the first
            model's `max_position_embeddings`.
        tokenizer (`str | Path`, *optional*): the tokenizer for the data; default: the first model's.
        lm_eval (`LmEvalSettings`, *optional*): lm-evaluation-harness tasks to run on every model as well.
        log (`Callable[[str], None]`, *optional*): receives one line per model evaluated.

    Returns:
        `EvalReport`: every model's metrics, ranked.

    Raises:
        `UsageError`: bad options. `DataError`: unreadable data or models (every folder's config and weights files,
        and the data, are checked before the first model is loaded).

    Example:

    ```python
    >>> report = evaluate(["runs/sweep"], "heldout.jsonl", baselines=True)
    >>> [(r.label, round(r.metrics["loss"], 4)) for r in report.ranked][:2]
    [('ema_power=0.3,bias_power=0.2', 1.3608), ('ema_power=0.5,bias_power=0.2', 1.3611)]
    ```
    """
    log = log or (lambda line: None)
    _check_options(data, lm_eval, dtype=dtype, batch_size=batch_size, max_length=max_length, beta=beta)
    device = check_device(device)
    candidates = find_candidates(models, baselines=baselines)
    settings = {"device": device, "dtype": dtype, "batch_size": batch_size}
    if lm_eval is not None:
        from .lm_eval_backend import check_lm_eval

        check_lm_eval(lm_eval.tasks, include_path=lm_eval.include_path)
        settings["lm_eval"] = {"tasks": lm_eval.tasks, "include_path": lm_eval.include_path, "limit": lm_eval.limit,
                               "num_fewshot": lm_eval.num_fewshot}
    eval_data = load_eval_data(data) if data is not None else None
    metric = ranking_metric(metric, eval_data.kind if eval_data else None, lm_eval)
    scorer = None
    if eval_data is not None:
        tokenizer_source = str(tokenizer or candidates.models[0].source)
        max_length = max_length or _max_positions(candidates.models[0].source)
        prepared = prepare(eval_data, _load_tokenizer(tokenizer_source), max_length=max_length)
        settings.update(tokenizer=tokenizer_source, max_length=max_length)
        scorer = _Scorer(prepared, device=device, dtype=dtype, batch_size=batch_size)
        if eval_data.kind == "preference":
            reference = str(ref_model) if ref_model is not None else _default_reference(candidates.models)
            settings.update(reference=reference, beta=beta)
            started = time.perf_counter()
            scorer.set_reference(reference, beta=beta)
            log(f"reference {reference}: scored {len(prepared.sequences)} sequences in {time.perf_counter() - started:.1f} s")
    directions = {name: m.higher_is_better for name, m in METRICS.items()}
    results = []
    for number, candidate in enumerate(candidates.models, 1):
        started = time.perf_counter()
        metrics = scorer.metrics(candidate.source) if scorer is not None else {}
        if lm_eval is not None:
            from .lm_eval_backend import run_lm_eval

            scores, higher = run_lm_eval(candidate.source, lm_eval, device=device, dtype=dtype, batch_size=batch_size)
            metrics.update(scores)
            directions.update(higher)
        seconds = time.perf_counter() - started
        results.append(Result(candidate=candidate, metrics=metrics, seconds=seconds))
        metric = metric or next(iter(metrics), None)
        if metric is None:
            raise DataError(f"{candidate.source}: lm-eval reported no metric for {', '.join(lm_eval.tasks)}")
        if metric not in metrics:  # a TASK/METRIC lm-eval does not report: known after the first model
            raise UsageError(f"--metric {metric}: not among the metrics computed ({', '.join(metrics)})")
        log(f"[{number}/{len(candidates.models)}] {candidate.label}: {metric} {metrics[metric]:.6g} ({seconds:.1f} s)")
    summary = _data_summary(eval_data, scorer.prepared) if scorer is not None else None
    return rank(results, metric=metric, directions=directions, data=summary, settings=settings,
                sweep_dir=candidates.sweep_dir)


class _Scorer:
    """The held-out data's metrics of one model after another (and the DPO reference's sums, kept)."""

    def __init__(self, prepared: PreparedData, *, device: str, dtype: str, batch_size: int) -> None:
        self.prepared = prepared
        self.options = {"device": device, "dtype": dtype, "batch_size": batch_size}
        self.reference: tuple[Path | None, SequenceScores] | None = None
        self.beta = DEFAULT_BETA

    def set_reference(self, source: str, *, beta: float) -> None:
        self.reference = (_resolved(source), _score(source, self.prepared, **self.options))
        self.beta = beta

    def metrics(self, source: str) -> dict[str, float]:
        if self.reference is None:
            return loss_metrics(_score(source, self.prepared, **self.options))
        folder, reference_scores = self.reference
        same = folder is not None and folder == _resolved(source)  # the reference itself (a baseline): scored already
        scores = reference_scores if same else _score(source, self.prepared, **self.options)
        return preference_metrics(scores, reference_scores, beta=self.beta)


def _resolved(source: str) -> Path | None:
    path = Path(source)
    return path.resolve() if path.exists() else None


def load_model(source: str, *, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM with transformers, check that every weight came from the folder, and put it in eval mode.

    Raises:
        `DataError`: transformers cannot load it, or the folder's tensors do not fit its config (a tensor that
        transformers would initialise at random is never evaluated).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, output_loading_info=True)
    except Exception as e:  # OSError, ValueError, safetensors errors...: one line that names the folder
        raise DataError(f"{source}: transformers cannot load it as a causal LM ({first_line(e)})") from e
    problems = [f"{what} {', '.join(sorted(info.get(key) or []))}" for key, what in
                (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mismatched"))
                if info.get(key)]
    if problems:
        raise DataError(f"{source}: its weights do not fit its config.json ({'; '.join(problems)}); the folder is incomplete")
    return model.to(device).eval()


def _score(source: str, prepared: PreparedData, *, device: str, dtype: str, batch_size: int):
    from .scoring import score_sequences

    model = load_model(source, device=device, dtype=dtype)
    try:
        pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
        vocab = model.get_input_embeddings().num_embeddings
        largest = max(max(sequence.input_ids) for sequence in prepared.sequences)
        if largest >= vocab:
            raise DataError(f"{source}: the data's token ids go up to {largest} but the model has {vocab} embeddings; "
                            "pass --tokenizer with the tokenizer it was trained with")
        return score_sequences(model, prepared.sequences, batch_size=batch_size, pad_token_id=pad)
    finally:
        alive = weakref.ref(model)
        del model
        if alive() is not None:  # held by a reference cycle: collect it before the next model is loaded
            gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _check_options(data, lm_eval, *, dtype: str, batch_size: int, max_length: int | None, beta: float) -> None:
    if data is None and lm_eval is None:
        raise UsageError("give --data (held-out data) or --lm-eval-tasks, or both")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens, got {max_length}")
    if not beta > 0:
        raise UsageError(f"--beta must be positive, got {beta}")


def ranking_metric(metric: str | None, kind: str | None, lm_eval: LmEvalSettings | None, *, option: str = "--metric") -> str | None:
    """The metric models are ranked by: `metric`, checked against the data's kind, or the kind's default.

    Raises:
        `UsageError`: a metric this data does not give.
    """
    if metric is None:
        return DEFAULT_METRIC[kind] if kind is not None else None  # lm-eval only: its first metric, once known
    if metric in METRICS:
        if kind is None or metric not in METRICS_OF_KIND[kind]:
            offered = ", ".join(METRICS_OF_KIND[kind]) if kind else "none without --data"
            raise UsageError(f"{option} {metric}: not a metric of this data (its metrics: {offered})")
    elif not (lm_eval is not None and "/" in metric):
        lm_eval_metrics = ", or TASK/METRIC of an --lm-eval-tasks task" if option == "--metric" else ""
        raise UsageError(f"{option} {metric}: choose from {', '.join(METRICS)}{lm_eval_metrics}")
    return metric


def _default_reference(models: list[Candidate]) -> str:
    theta0s = dict.fromkeys(m.record.theta0 for m in models if m.record is not None and m.record.theta0)
    if len(theta0s) == 1:
        return next(iter(theta0s))
    if not theta0s:
        raise UsageError("preference data needs a reference model: pass --ref-model (the models have no bema_offline.json naming θ0)")
    raise UsageError(f"the outputs have different θ0 ({', '.join(theta0s)}); pass --ref-model to choose the DPO reference")


def _max_positions(source: str) -> int | None:
    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text_config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 1 else None


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise DataError(f"{source}: cannot load its tokenizer ({first_line(e)}); pass --tokenizer") from e


def _data_summary(eval_data, prepared: PreparedData | None) -> dict | None:
    if eval_data is None:
        return None
    return {
        "path": str(eval_data.path),
        "split": eval_data.split,
        "kind": eval_data.kind,
        "conversational": eval_data.conversational,
        "rows": prepared.rows,
        "dropped_rows": prepared.dropped,
        "truncated_sequences": prepared.truncated,
        "scored_tokens": prepared.scored_tokens,
    }


