"""Plain-text reports of a plan (for `--dry-run`) and of a finished run."""

from __future__ import annotations

from ..engine.plan import Plan
from ..errors import steps_text
from .chart import source_name, weights_bar_chart


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # pragma: no cover


def plan_report(plan: Plan, output_paths: list[str]) -> str:
    lines = [f"run: {plan.run_dir}"]
    lines.append(f"checkpoints found: {len(plan.found_steps)} (steps {steps_text(plan.found_steps)})")
    state = plan.trainer_state
    if state:
        facts = ", ".join(f"{k} {v}" for k, v in state.items() if v is not None)
        lines.append(f"trainer_state.json of the newest checkpoint: {facts}")
    lines.append(f"read: {', '.join(source_name(s) for s in plan.read_steps)} ({_size(plan.bytes_to_read)})")
    if plan.ignored_steps:
        lines.append(f"ignored (no weight in any output): {steps_text(plan.ignored_steps)}")
    lines.append(f"tensors: {len(plan.tensors)}")
    lines.extend(f"note: {note}" for note in plan.notes)
    for run in plan.schedules:
        s = run.schedule
        title = f"schedule {run.name}" if run.name else "schedule"
        params = ", ".join(f"{k}={v}" for k, v in s.to_dict().items())
        lines += ["", f"{title}: {params}", f"  θ0: {source_name(s.theta0_step)}"]
        if run.missing_steps:
            lines.append(f"  skipped update steps (no checkpoint): {steps_text(run.missing_steps, total=run.missing_count)}")
        lines.append(f"  {'step':>8}  {'beta':>10}  {'alpha':>10}")
        for step in run.update_steps:
            clamp = "  (clamped)" if s.beta_is_clamped(step) else ""
            lines.append(f"  {step:>8}  {s.beta(step):>10.6f}  {s.alpha(step):>10.6f}{clamp}")
    for spec, path in zip(plan.outputs, output_paths):
        what = spec.method.describe() if spec.method is not None and not spec.replayed else spec.kind
        negative = "; some are negative: it extrapolates" if min(spec.weights.values()) < 0 and not spec.replayed else ""
        lines += ["", f"output {path}: {what} at step {spec.step}, effective weights (sum {sum(spec.weights.values()):.6f}{negative}):"]
        lines.append(weights_bar_chart(spec.weights))
    return "\n".join(lines)


def run_warnings(plan: Plan) -> list[str]:
    """What a finished run says beside its outputs: skipped update steps, ignored checkpoints, a lone checkpoint."""
    lines = []
    for run in plan.schedules:
        if run.missing_count:
            where = f" (config {run.name})" if run.name else ""
            lines.append(
                f"warning: skipped {run.missing_count} update step{'s' if run.missing_count > 1 else ''} without a checkpoint{where}: "
                f"{steps_text(run.missing_steps, total=run.missing_count)}"
            )
    if plan.ignored_steps:
        lines.append(f"note: ignored checkpoints (no weight in any output): {steps_text(plan.ignored_steps)}")
    for run in plan.schedules:
        if len(run.update_steps) == 1:
            where = f"config {run.name}: " if run.name else ""
            lines.append(
                f"warning: {where}only one checkpoint (step {run.update_steps[0]}) is averaged, with θ0; "
                "check --update-freq against the run's save_steps"
            )
    return lines
