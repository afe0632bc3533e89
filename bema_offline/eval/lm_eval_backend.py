"""The optional lm-evaluation-harness backend of `bema-offline eval --lm-eval-tasks` (the `eval` extra).

Each model folder goes through `lm_eval.simple_evaluate` with lm-eval's own Hugging Face model (`hf`), so the numbers
are the ones lm-eval's command line would print for the folder. Tasks are lm-eval's built-in tasks, or task YAML files
in `--lm-eval-include` (a local task can read local data, e.g. `dataset_path: json` with `data_files`). Each metric is
named `TASK/METRIC` (with `,FILTER` when the filter is not "none"); its direction is lm-eval's `higher_is_better`.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math

from ..errors import BemaError, UsageError

_SKIPPED_KEYS = {"alias", "name", "sample_len", "samples", " "}
_task_managers: dict[tuple[str | None, bool], object] = {}


class MissingLmEvalError(BemaError):
    """lm_eval is not installed."""

    exit_code = 1


def require_lm_eval():
    """Import lm_eval, or fail with one line that names the extra to install."""
    try:
        import lm_eval
    except ImportError as e:
        raise MissingLmEvalError("--lm-eval-tasks needs lm-evaluation-harness: pip install 'bema-offline[eval]'") from e
    return lm_eval


def check_lm_eval(tasks: list[str], *, include_path: str | None = None) -> None:
    """Check that lm_eval is installed and knows every task, before any model is evaluated.

    Raises:
        `MissingLmEvalError`: lm_eval is not installed. `UsageError`: an unknown task (with the closest names).
    """
    require_lm_eval()
    manager = task_manager(tasks, include_path=include_path)
    known = manager.all_tasks
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; --lm-eval-include DIR adds task YAML files"
            raise UsageError(f"--lm-eval-tasks {task}: lm-eval has no such task{hint}")


def task_manager(tasks: list[str], *, include_path: str | None = None):
    """lm-eval's task index: only `include_path` when it holds every task asked for (indexing lm-eval's built-in tasks
    takes seconds), else the built-in tasks too. Built once per process."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        if include_path is not None:
            key = (include_path, False)
            if key not in _task_managers:
                _task_managers[key] = TaskManager(include_path=include_path, include_defaults=False)
            if all(task in _task_managers[key].all_tasks for task in tasks):
                return _task_managers[key]
        key = (include_path, True)
        if key not in _task_managers:
            _task_managers[key] = TaskManager(include_path=include_path)
        return _task_managers[key]


def run_lm_eval(source: str, settings, *, device: str = "cpu", dtype: str = "float32",
                batch_size: int = 8) -> tuple[dict[str, float], dict[str, bool]]:
    """Run lm-eval's tasks on one model folder.

    Args:
        source (`str`): a model folder (or Hub id).
        settings (`LmEvalSettings`): tasks, include path, limit and few-shot count.
        device, dtype, batch_size: passed to lm-eval's `hf` model.

    Returns:
        `(dict[str, float], dict[str, bool])`: each metric's value and whether higher is better, keyed `TASK/METRIC`.

    Example:

    ```python
    >>> run_lm_eval("runs/sweep/best", LmEvalSettings(tasks=["arc_easy"], limit=100))
    ({'arc_easy/acc': 0.62, 'arc_easy/acc_norm': 0.58}, {'arc_easy/acc': True, 'arc_easy/acc_norm': True})
    ```
    """
    lm_eval = require_lm_eval()
    manager = task_manager(settings.tasks, include_path=settings.include_path)
    with _quiet():
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": source, "dtype": dtype},
            tasks=list(settings.tasks),
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            batch_size=batch_size,
            device=device,
            task_manager=manager,
            log_samples=False,
        )
    metrics: dict[str, float] = {}
    higher: dict[str, bool] = {}
    for task, values in output["results"].items():
        directions = output.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if key in _SKIPPED_KEYS or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}" + (f",{filter_name}" if filter_name not in ("", "none") else "")
            metrics[name] = float(value) if value is not None else math.nan
            higher[name] = bool(directions.get(metric, True))
    return metrics, higher


@contextlib.contextmanager
def _quiet():
    """lm-eval logs at INFO and prints tables; keep only its warnings and errors."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
