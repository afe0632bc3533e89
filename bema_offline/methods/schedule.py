"""The BEMA schedule: parameters with TRL's names, update steps, the factors β and α, and effective weights.

Everything here is scalar arithmetic on Python floats, done exactly as TRL's `BEMACallback` does it, so that
the tensor engine can replay the recurrence bit for bit.

Step 0 stands for the weights before training (the base model); `checkpoint-N` is step N.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import DataError, UsageError, steps_text

CONVENTIONS = ("trl", "paper")


@dataclass(frozen=True)
class BEMASchedule:
    """Parameters of Bias-Corrected EMA, with the names and defaults of TRL's `BEMACallback`.

    Args:
        update_freq (`int`, defaults to 400): update the average every this many steps (φ).
        ema_power (`float`, defaults to 0.5): power of the EMA factor β (κ). 0 makes the EMA the last iterate.
        bias_power (`float`, defaults to 0.2): power of the bias-correction factor α (η). 0 gives α = 1, the
            *full* correction; to turn the correction off, save the plain EMA instead.
        lag (`float`, defaults to 10): virtual starting age of the schedule (ρ).
        update_after (`int`, defaults to 0): burn-in (τ). θ0 is the base model when 0, else the weights at step τ.
        multiplier (`float`, defaults to 1.0): time multiplier (γ).
        min_ema_multiplier (`float`, defaults to 0.0): lower clamp on β.
        convention (`str`, defaults to "trl"): "trl" replays TRL's `BEMACallback`; "paper" replays the authors'
            offline code (abblock/bema), which updates at every checkpoint and uses its own clock (with θ0
            taken at step τ, which their code gets wrong when τ > 0).

    Example:

    ```python
    >>> s = BEMASchedule()
    >>> round(s.beta(400), 6), round(s.alpha(400), 6)
    (0.049386, 0.300222)
    ```
    """

    update_freq: int = 400
    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10
    update_after: int = 0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0
    convention: str = "trl"

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise UsageError(f"convention must be one of {', '.join(CONVENTIONS)}, got {self.convention!r}")
        if isinstance(self.update_freq, bool) or not isinstance(self.update_freq, int) or self.update_freq < 1:
            raise UsageError(f"update_freq must be an integer >= 1, got {self.update_freq!r}")
        if isinstance(self.update_after, bool) or not isinstance(self.update_after, int) or self.update_after < 0:
            raise UsageError(f"update_after must be an integer >= 0, got {self.update_after!r}")
        for name in ("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value!r}")
        if self.ema_power < 0 or self.bias_power < 0:
            raise UsageError(
                f"ema_power and bias_power must be >= 0, got {self.ema_power} and {self.bias_power}; "
                "to turn the bias correction off, save the plain EMA (--no-bias-correction)"
            )
        if not 0.0 <= self.min_ema_multiplier <= 1.0:
            raise UsageError(f"min_ema_multiplier must lie in [0, 1], got {self.min_ema_multiplier}")

    @property
    def theta0_step(self) -> int:
        """The step whose weights are θ0 (0 means the base model)."""
        return self.update_after

    def replace(self, **changes) -> BEMASchedule:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- which steps update the average -------------------------------------------------------------------

    def is_update_step(self, step: int) -> bool:
        """TRL: steps t > τ with (t − τ) divisible by φ. Paper: every checkpoint after τ."""
        if step <= self.update_after:
            return False
        return self.convention == "paper" or (step - self.update_after) % self.update_freq == 0

    def update_steps(self, available_steps: Iterable[int]) -> list[int]:
        """The update steps up to the last available step.

        For TRL's convention these are τ + φ, τ + 2φ, ... whether or not a checkpoint exists for them (a missing
        one makes an exact replay impossible). For the paper's convention they are the available steps after τ.
        """
        available = sorted(set(available_steps))
        if not available:
            return []
        if self.convention == "paper":
            return [s for s in available if s > self.update_after]
        last = available[-1]
        return list(range(self.update_after + self.update_freq, last + 1, self.update_freq))

    # --- the factors ----------------------------------------------------------------------------------------

    def _clock(self, step: int) -> tuple[float, float]:
        """The bases of β and α at `step`, as each convention computes them."""
        if self.convention == "trl":
            x = self.lag + self.multiplier * step
            return x, x
        time = max(step - self.update_after + self.lag, 1)
        return 1 + self.multiplier * time, 1 + time

    def check_steps(self, steps: Iterable[int]) -> None:
        """Raise a `UsageError` if β or α is undefined at one of `steps`: a non-positive base, or a power that
        overflows (a base below 1 with a large power)."""
        for step in steps:
            beta_base, alpha_base = self._clock(step)
            if beta_base <= 0 or alpha_base <= 0:
                raise UsageError(
                    f"at step {step} the schedule base lag + multiplier*step is {min(beta_base, alpha_base):g} <= 0; "
                    "choose lag and multiplier so that it stays positive"
                )
            try:
                factors = (self.beta(step), self.alpha(step))
            except OverflowError:
                factors = (math.inf,)
            if not all(math.isfinite(f) for f in factors):
                raise UsageError(
                    f"at step {step} the schedule base is {min(beta_base, alpha_base):g}, so β = base^-{self.ema_power:g} "
                    f"or α = base^-{self.bias_power:g} overflows; use a base of at least 1 (lag, multiplier) or smaller powers"
                )

    def beta(self, step: int) -> float:
        """EMA factor β_t = max(x^(−κ), min_ema_multiplier), in TRL's float arithmetic."""
        beta_base, _ = self._clock(step)
        return max(beta_base ** (-self.ema_power), self.min_ema_multiplier)

    def alpha(self, step: int) -> float:
        """Bias-correction factor α_t = x^(−η)."""
        _, alpha_base = self._clock(step)
        return alpha_base ** (-self.bias_power)

    def beta_is_clamped(self, step: int) -> bool:
        beta_base, _ = self._clock(step)
        return beta_base ** (-self.ema_power) < self.min_ema_multiplier


KINDS = ("bema", "ema")


def effective_weights(
    schedule: BEMASchedule, update_steps: Sequence[int], output_steps: Iterable[int], kind: str = "bema"
) -> dict[int, dict[int, float]]:
    """Each output's weight on θ0 and on every checkpoint, from the recurrence run on coefficient vectors.

    Every output is an affine combination of θ0 (key `schedule.theta0_step`, 0 for the base) and the checkpoints
    at `update_steps`; the weights sum to 1.

    Args:
        schedule (`BEMASchedule`): the parameters.
        update_steps (`Sequence[int]`): the update steps replayed, in order (missing ones already removed).
        output_steps (`Iterable[int]`): update steps at which an output is taken.
        kind (`str`, defaults to "bema"): "bema" or "ema".

    Returns:
        `dict[int, dict[int, float]]`: for each output step, a mapping from source step to weight.

    Example:

    ```python
    >>> w = effective_weights(BEMASchedule(), [400, 800], [800])
    >>> round(w[800][0], 6), round(w[800][400], 6), round(w[800][800], 6)
    (0.655211, 0.047651, 0.297137)
    ```
    """
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    wanted = set(output_steps)
    theta0 = schedule.theta0_step
    sources = [theta0, *update_steps]
    ema = {source: 0.0 for source in sources}
    ema[theta0] = 1.0
    weights: dict[int, dict[int, float]] = {}
    for step in update_steps:
        beta = schedule.beta(step)
        for source in sources:
            ema[source] *= 1 - beta
        ema[step] += beta
        if step in wanted:
            out = dict(ema)
            if kind == "bema":
                alpha = schedule.alpha(step)
                out[step] += alpha
                out[theta0] -= alpha
            weights[step] = {source: w for source, w in out.items() if source == theta0 or source <= step}
    return weights


MISSING_LISTED = 100  # update steps without a checkpoint that are listed (all are counted)


@dataclass(frozen=True)
class UpdateSteps:
    """The update steps of a schedule on a run's checkpoints.

    Attributes:
        present (`list[int]`): the update steps that have a checkpoint, in order; the last is the output's step.
        missing (`list[int]`): the first `MISSING_LISTED` update steps without one (skipped with `allow_missing`).
        missing_count (`int`): how many update steps have no checkpoint.
    """

    present: list[int]
    missing: list[int]
    missing_count: int


def checked_update_steps(
    schedule: BEMASchedule, steps: Iterable[int], *, base: bool, allow_missing: bool = False, where: str = ""
) -> UpdateSteps:
    """The schedule's update steps on these checkpoints, after checking that the schedule can be replayed from them.

    Works in O(checkpoints) whatever the steps' values (a stray `checkpoint-1000000000000` costs nothing); when update
    steps have no checkpoint, the error says what would fix the replay.

    Args:
        schedule (`BEMASchedule`): the parameters.
        steps (`Iterable[int]`): the checkpoints' steps.
        base (`bool`): whether the model before training (step 0) is available.
        allow_missing (`bool`, defaults to False): skip update steps without a checkpoint instead of failing.
        where (`str`, defaults to ""): put after the messages' subject, e.g. " (config slow)".

    Raises:
        `UsageError`: θ0 is the base model (update_after 0) and none is given, or β or α is undefined.
        `DataError`: θ0's checkpoint is missing, update steps have no checkpoint (unless `allow_missing`), or no
            checkpoint falls on an update step.
    """

    steps = sorted(set(steps))
    tau = schedule.theta0_step
    if tau == 0 and not base:
        raise UsageError(
            f"update_after is 0{where}, so θ0 is the model before training: pass --base-model "
            "(a local folder or a Hub repo id), or set --update-after to a saved step"
        )
    if tau != 0 and tau not in steps:
        raise DataError(
            f"update_after is {tau}{where}, so θ0 is checkpoint-{tau}, which is not among the checkpoints "
            f"(steps {steps_text(steps)}); choose --update-after from those steps"
        )
    present = [step for step in steps if schedule.is_update_step(step)]
    schedule.check_steps(present)
    missing, missing_count = _missing_update_steps(schedule, present, steps[-1] if steps else 0)
    if missing_count and not allow_missing:
        raise DataError(
            f"update steps {steps_text(missing, total=missing_count)} have no checkpoint{where}, so an exact replay is "
            f"impossible; {_missing_hint(schedule, steps, present, missing)}"
        )
    if not present:
        raise DataError(
            f"no checkpoint falls on an update step{where} (update_after {tau}, update_freq "
            f"{schedule.update_freq}; found steps {steps_text(steps)})"
        )
    return UpdateSteps(present, missing, missing_count)


def _missing_update_steps(schedule: BEMASchedule, present: list[int], last: int) -> tuple[list[int], int]:
    """The first `MISSING_LISTED` update steps up to `last` that have no checkpoint, and how many there are."""
    if schedule.convention == "paper":  # every checkpoint is an update step: none can be missing
        return [], 0
    tau, phi = schedule.update_after, schedule.update_freq
    total = max(0, (last - tau) // phi)
    have = set(present)
    listed, step = [], tau + phi
    while len(listed) < MISSING_LISTED and len(listed) < total - len(present) and step <= last:
        if step not in have:
            listed.append(step)
        step += phi
    return listed, total - len(present)


def _missing_hint(schedule: BEMASchedule, steps: list[int], present: list[int], missing: list[int]) -> str:
    """What fixes a replay with missing update steps, without repeating what the user already passed."""
    hints = []
    exact_from = _exact_start(schedule, steps) if schedule.convention == "trl" else None
    if exact_from is not None and exact_from != schedule.update_after:
        older = " (the older checkpoints were deleted, e.g. by save_total_limit)" if exact_from == steps[0] else ""
        hints.append(f"replay exactly from checkpoint-{exact_from} with --update-after {exact_from}{older}")
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    cadence = gaps.pop() if len(gaps) == 1 else None
    if cadence and cadence != schedule.update_freq and exact_from is None:
        hints.append(f"checkpoints are {cadence} steps apart, so try --update-freq {cadence}")
    if len(steps) > 1 and missing and missing[0] > steps[-2]:
        hints.append(f"leave out the far checkpoint-{steps[-1]} with --max-step {steps[-2]}")
    allow = "pass --allow-missing to skip them"
    if present:
        theta0_weight = effective_weights(schedule, present, [present[-1]])[present[-1]][schedule.theta0_step]
        allow += f" (θ0 would then weigh {theta0_weight:.3f} in the output)"
    return "; ".join(hints + [("or " if hints else "") + allow])


def _exact_start(schedule: BEMASchedule, steps: list[int]) -> int | None:
    """The oldest of the first few checkpoints from which, as θ0, the schedule's update steps all have a checkpoint."""
    last = steps[-1]
    for start in steps[:5]:
        later = sum(1 for step in steps if step > start and (step - start) % schedule.update_freq == 0)
        if later and later == (last - start) // schedule.update_freq:
            return start
    return None
