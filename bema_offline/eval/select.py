"""Pick the best output of a finished sweep and publish it as `SWEEP/best`: the library side of `--select-by`.

`select_best` evaluates every output of the sweep, writes `eval.json`, `eval.md` and `eval.png` into the sweep
folder, and publishes a copy of the winner at `SWEEP/best`: a real folder (a symlink would not survive a Hub upload),
written to a staging folder beside it and renamed into place, so that `best` is either absent, the previous
selection, or complete. Its `bema_offline.json` is the winner's with a `selection` entry, its model card carries the
leaderboard, and the report files go with it.

A failure while evaluating leaves the sweep as it was and publishes nothing. A tie is reported with what decided it;
a NaN metric is reported and never selected; a baseline that beats every average is reported (only an average is
published).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UsageError
from ..files import replace_file
from ..output.card import PROVENANCE_FILE, write_card
from ..output.publish import OutputLock, discard, fresh_staging, interrupts_deferred, publish, staging_path
from .candidates import BEST_FOLDER, is_model_folder
from .leaderboard import json_number
from .record import read_output_record
from .report import JSON_FILE, EvalReport
from .runner import DEFAULT_BETA, LmEvalSettings, evaluate


@dataclass(frozen=True)
class Selection:
    """What `select_best` chose and wrote.

    Args:
        report (`EvalReport`): the ranking of every output.
        winner (`Path`): the sweep output that won.
        best (`Path`): its published copy, `SWEEP/best`.
        report_files (`list[Path]`): `eval.json`, `eval.md` and `eval.png` in the sweep folder.
    """

    report: EvalReport
    winner: Path
    best: Path
    report_files: list[Path]


def select_best(
    sweep_dir: str | Path,
    data: str | Path | None,
    *,
    metric: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    baselines: bool = False,
    ref_model: str | Path | None = None,
    beta: float = DEFAULT_BETA,
    max_length: int | None = None,
    tokenizer: str | Path | None = None,
    lm_eval: LmEvalSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> Selection:
    """Evaluate every output of a finished sweep, write the report into it, and publish the winner as `SWEEP/best`.

    Args:
        sweep_dir (`str | Path`): the output folder of a sweep (`bema-average --grid/--sweep ... -o SWEEP`), or of any
            run with several outputs.
        data (`str | Path`, *optional*): held-out data (see `bema_offline.eval.evaluate`); may be None with `lm_eval`.
        metric (`str`, *optional*): the metric to rank by; default: loss, or reward_accuracy for preference data.
        device, dtype, batch_size, ref_model, beta, max_length, tokenizer, lm_eval: as for `evaluate`.
        baselines (`bool`, defaults to False): also rank the run's base model and newest checkpoint (never published).
        log (`Callable[[str], None]`, *optional*): receives progress lines.

    Returns:
        `Selection`: the report, the winner and the published folder.

    Raises:
        `UsageError`: not a sweep folder, or a `best` there that no selection wrote. `DataError`: unreadable data or
        outputs, or no output with a finite metric. Nothing is published then.

    Example:

    ```python
    >>> selection = select_best("runs/sweep", "heldout.jsonl")
    >>> selection.winner.name, selection.best
    ('ema_power=0.3,bias_power=0.2', PosixPath('runs/sweep/best'))
    ```
    """
    sweep_dir = Path(sweep_dir)
    best = sweep_dir / BEST_FOLDER
    if not sweep_dir.is_dir() or is_model_folder(sweep_dir):
        raise UsageError(f"{sweep_dir}: not a sweep folder (one model folder per config); there is nothing to choose from")
    _check_previous(best)
    report = evaluate([sweep_dir], data, baselines=baselines, metric=metric, ref_model=ref_model, beta=beta,
                      device=device, dtype=dtype, batch_size=batch_size, max_length=max_length, tokenizer=tokenizer,
                      lm_eval=lm_eval, log=log)
    report_files = report.write(sweep_dir)
    if report.winner is None:
        raise DataError(f"{sweep_dir}: no output has a finite {report.metric}; nothing was published (see {sweep_dir / JSON_FILE})")
    if report.winner.candidate.record is None:
        raise DataError(f"{report.winner.candidate.source}: the winner has no bema_offline.json; best/ is published for "
                        "outputs of bema-average only, and nothing was published")
    winner = Path(report.winner.candidate.source)
    publish_best(winner, best, report, extra_files=report_files)
    return Selection(report=report, winner=winner, best=best, report_files=report_files)


def publish_best(winner: Path, best: Path, report: EvalReport, *, extra_files: Sequence[Path] = ()) -> None:
    """Copy `winner` to `best` through a staging folder, with the selection in its record, the leaderboard in its card
    and `extra_files` (the report) beside them, and rename it into place (replacing a previous selection atomically)."""
    with OutputLock(best) as lock:
        staging, _ = fresh_staging(best)
        try:
            shutil.copytree(winner, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
            record = json.loads((winner / PROVENANCE_FILE).read_text())
            record["selection"] = selection_record(winner, report)
            replace_file(staging / PROVENANCE_FILE, (json.dumps(record, indent=2, allow_nan=False) + "\n").encode())
            write_card(staging, record)  # the card carries the leaderboard (`record["selection"]`) in every rendering
            for path in extra_files:
                shutil.copy2(path, staging / path.name)
            with interrupts_deferred():
                publish(staging, best, overwrite=True)
                lock.release()
        except BaseException:
            discard(staging_path(best))
            raise


def selection_record(winner: Path, report: EvalReport) -> dict:
    """The `selection` entry of `best/bema_offline.json`: what was chosen, from where, by what, and the whole ranking
    (as `eval.json` holds it), from which `leaderboard.with_selection` renders the card again."""
    ranking = {key: value for key, value in report.to_dict().items() if key not in ("tool", "version", "created")}
    return {"source": str(winner.resolve()), "value": json_number(report.winner.metrics[report.metric]), **ranking}


def _check_previous(best: Path) -> None:
    """A `best` that a selection wrote is replaced; anything else there is refused."""
    if not (best.exists() or best.is_symlink()):
        return
    record = read_output_record(best) if best.is_dir() and not best.is_symlink() else None
    if record is None or "selection" not in record.raw:
        raise UsageError(f"{best} exists and was not written by a selection; move it away, it would be replaced")
