"""What the engine does at each step, as scalars: the plan turned into ops on slots, the same for every group.

A slot holds a float32 (or `--accum-dtype`) running value per element: an EMA of a replayed config, or the sum of a
weighted output. At each read step, in order:

1. the EMAs that start there take θ0 (`starts`);
2. the EMAs are updated towards θ_t, TRL's `ema.mul_(1 − β).add_(θ_t, alpha=β)` (`updates`);
3. the weighted sums take θ_t in: the first term `acc = θ_t · w`, the others `acc.add_(θ_t, alpha=w)` (`sums`), each
   sum over its sources in step order, with the float64 weight rounded once to the accumulation dtype;
4. the outputs due are written (`outputs`): `ema + α·(θ_t − θ0)` or the EMA for a replay, the sum as it stands
   for a weighted output.

Replayed configs whose EMAs are the same tensors, op for op (same θ0, update steps and β), share one slot. Updates
after an EMA's last output change nothing written, and are left out. The engine runs these ops on the C kernel
(`kernels.Program`) or on torch's ops, with the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import Plan


@dataclass(frozen=True)
class OutputOp:
    """Write output `index` from `slot`: `ema + alpha·(θ_t − θ0)` when `alpha` is set (θ0 the snapshot of step
    `theta0_step`), else the slot as it stands."""

    index: int
    slot: int
    theta0_step: int | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class SumOp:
    slot: int
    weight: float
    first: bool  # the sum's first term: `acc = θ_t · w`


@dataclass
class Program:
    """The ops of every step of a plan (see the module docstring)."""

    theta0_steps: list[int]  # steps whose values are kept as float32 snapshots (θ0 of the replays)
    slots: int
    starts: dict[int, list[int]] = field(default_factory=dict)  # θ0 step -> EMA slots that start there
    updates: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # step -> (EMA slot, β)
    sums: dict[int, list[SumOp]] = field(default_factory=dict)  # step -> terms of the weighted sums
    outputs: dict[int, list[OutputOp]] = field(default_factory=dict)  # step -> outputs written after its ops

    @property
    def output_steps(self) -> list[int]:
        return sorted(self.outputs)


def ema_slots(plan: Plan) -> list[int]:
    """The EMA each replayed config uses. Configs with the same θ0 and the same update steps and β share one: their
    EMAs are the same tensors, op for op (in a grid over `bias_power` alone, all configs share one EMA).

    Example: `--grid ema_power=0.3,0.5 bias_power=0.1,0.2` has 4 configs and 2 EMAs; slots `[0, 0, 1, 1]`.
    """
    keys: dict[tuple, int] = {}
    slots = []
    for run in plan.schedules:
        key = (run.schedule.theta0_step, tuple((step, run.schedule.beta(step)) for step in run.update_steps))
        slots.append(keys.setdefault(key, len(keys)))
    return slots


def make_program(plan: Plan) -> Program:
    """The plan's ops, step by step."""
    schedule_slots = ema_slots(plan)
    emas = len(set(schedule_slots))
    weighted = plan.weighted_outputs
    program = Program(sorted({run.schedule.theta0_step for run in plan.schedules}), emas + len(weighted))
    last_output: dict[int, int] = {}  # EMA -> the step of its last output
    for out in plan.outputs:
        if out.replayed:
            slot = schedule_slots[out.schedule_index]
            last_output[slot] = max(out.step, last_output.get(slot, out.step))
    started = set()
    for index, run in enumerate(plan.schedules):
        slot = schedule_slots[index]
        if slot in started:
            continue
        started.add(slot)
        program.starts.setdefault(run.schedule.theta0_step, []).append(slot)
        for step in run.update_steps:
            if step in plan.sources and step <= last_output.get(slot, -1):
                program.updates.setdefault(step, []).append((slot, run.schedule.beta(step)))
    for index, out in enumerate(plan.outputs):
        if out.replayed:
            schedule = plan.schedules[out.schedule_index].schedule
            alpha = schedule.alpha(out.step) if out.kind == "bema" else None
            op = OutputOp(index, schedule_slots[out.schedule_index], schedule.theta0_step, alpha)
        else:
            slot = emas + weighted.index(index)
            for position, step in enumerate(sorted(out.weights)):
                program.sums.setdefault(step, []).append(SumOp(slot, out.weights[step], position == 0))
            op = OutputOp(index, slot)
        program.outputs.setdefault(out.step, []).append(op)
    return program
