"""Averages over a window of checkpoints: the uniform average (fairseq's `average_checkpoints`, NeMo, OLMo, LAWA)
and WSM's merge weights derived from a learning-rate decay shape (Tian et al. 2025, arXiv 2507.17634).

A window is the `last` K checkpoints, the checkpoints with steps in `window` = (A, B) (either end may be open), or
every checkpoint at hand. Neither method uses the base model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import DataError, UsageError, steps_text
from .base import Method, checkpoint_steps, nonzero, require_int

Window = tuple[int | None, int | None]


def parse_window(text: str) -> Window:
    """`A:B` -> (A, B), `A:` -> (A, None), `:B` -> (None, B): the steps A to B, both included.

    Raises:
        `UsageError`: not of that form, or A > B.
    """
    low, sep, high = str(text).strip().partition(":")
    try:
        if not sep or not (low.strip() or high.strip()):
            raise ValueError
        window = (int(low) if low.strip() else None, int(high) if high.strip() else None)
    except ValueError:
        raise UsageError(f"window {text!r}: write A:B (steps A to B), A: or :B, e.g. 1000:2000") from None
    _check_window(window)
    return window


def window_text(window: Window) -> str:
    low, high = window
    return f"{'' if low is None else low}:{'' if high is None else high}"


def _check_window(window: object) -> None:
    if not (isinstance(window, tuple) and len(window) == 2 and window != (None, None)):
        raise UsageError(f"window must be (A, B) steps with at least one end given, got {window!r}")
    for end in window:
        if end is not None:
            require_int("a window's step", end, minimum=0)
    low, high = window
    if low is not None and high is not None and low > high:
        raise UsageError(f"window {low}:{high} is empty: its first step is after its last")


@dataclass(frozen=True)
class _Windowed(Method):
    """A method over a window of checkpoints: `last` K, or the steps in `window`, or all (neither given)."""

    last: int | None = None
    window: Window | None = None

    def __post_init__(self) -> None:
        if self.last is not None:
            require_int(f"{self.name}: last", self.last, minimum=1)
        if self.window is not None:
            if isinstance(self.window, str):
                object.__setattr__(self, "window", parse_window(self.window))  # from a dict: "A:B"
            _check_window(self.window)
        if self.last is not None and self.window is not None:
            raise UsageError(f"{self.name}: give last or window, not both")

    def params(self) -> dict[str, object]:
        return {"last": self.last, "window": None if self.window is None else window_text(self.window)}

    def chosen(self, steps: Sequence[int]) -> list[int]:
        """The window's checkpoints, ascending."""
        steps = checkpoint_steps(steps)
        if self.last is not None:
            if self.last > len(steps):
                raise DataError(
                    f"{self.name}: last {self.last} checkpoints asked for, but there are {len(steps)} "
                    f"(steps {steps_text(steps)}); ask for fewer"
                )
            return steps[-self.last :]
        if self.window is not None:
            low, high = self.window
            chosen = [s for s in steps if (low is None or s >= low) and (high is None or s <= high)]
            if not chosen:
                raise DataError(
                    f"{self.name}: window {window_text(self.window)} holds no checkpoint (steps {steps_text(steps)})"
                )
            return chosen
        return steps

    def _window_label(self) -> str:
        if self.last is not None:
            return f"-last{self.last}"
        if self.window is not None:
            low, high = self.window
            return f"-from{low}" if high is None else f"-to{high}" if low is None else f"-steps{low}-{high}"
        return ""

    def _window_words(self) -> str:
        if self.last is not None:
            return f"the last {self.last} checkpoints"
        if self.window is not None:
            low, high = self.window
            if high is None:
                return f"the checkpoints from step {low}"
            return f"the checkpoints up to step {high}" if low is None else f"the checkpoints of steps {low} to {high}"
        return "every checkpoint"


@dataclass(frozen=True)
class Uniform(_Windowed):
    """The classic checkpoint average: weight 1/K on each of the window's K checkpoints.

    Args:
        last (`int`, *optional*): the K newest checkpoints.
        window (`tuple[int | None, int | None]`, *optional*): the checkpoints from step A to step B.

    Example:

    ```python
    >>> Uniform(last=2).weights([100, 200, 300], base=False)
    {200: 0.5, 300: 0.5}
    ```
    """

    name: ClassVar[str] = "uniform"

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        chosen = self.chosen(steps)
        return {step: 1 / len(chosen) for step in chosen}

    def label(self) -> str:
        return "uniform" + self._window_label()

    def describe(self) -> str:
        return f"uniform average of {self._window_words()}"


# The decay shapes f on [0, 1] (f(0) = 1, f(1) = 0) and their antiderivatives F, F(0) = 0.
DECAYS: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "linear": (lambda x: 1 - x, lambda x: x - x * x / 2),
    "cosine": (lambda x: (1 + math.cos(math.pi * x)) / 2, lambda x: x / 2 + math.sin(math.pi * x) / (2 * math.pi)),
    "1-sqrt": (lambda x: 1 - math.sqrt(x), lambda x: x - 2 / 3 * x**1.5),
}


@dataclass(frozen=True)
class WSM(_Windowed):
    """WSM's checkpoint merge (Warmup-Stable and Merge; Tian et al. 2025, arXiv 2507.17634): the weights that make a
    merge of checkpoints trained at a constant learning rate equal, to first order, the model a run would reach
    with the learning rate decayed by `decay` over the window.

    With the window's checkpoints at steps t_0 < ... < t_k and x = (t − t_0)/(t_k − t_0), the learning-rate
    multiplier between t_(i−1) and t_i is the mean of f there, W_i = (F(x_i) − F(x_(i−1)))/(x_i − x_(i−1)), and
    the merge weights are c_0 = 1 − W_1, c_j = W_j − W_(j+1), c_k = W_k (the paper's c_j = w_j − w_(j+1)).

    Args:
        decay (`str`): "linear", "cosine" or "1-sqrt".
        last (`int`, *optional*): the N newest checkpoints (at least 2).
        window (`tuple[int | None, int | None]`, *optional*): the checkpoints from step A to step B.
    """

    decay: str = ""

    name: ClassVar[str] = "wsm"

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise UsageError(f"wsm: decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        super().__post_init__()
        if self.last is not None and self.last < 2:
            raise UsageError(f"wsm: last must be >= 2 (a merge of {self.last} checkpoint has no decay to emulate)")

    def params(self) -> dict[str, object]:
        return {"decay": self.decay, **super().params()}

    def weights(self, steps: Sequence[int], *, base: bool, allow_missing: bool = False) -> dict[int, float]:
        chosen = self.chosen(steps)
        if len(chosen) < 2:
            raise DataError(f"wsm: the window holds one checkpoint (step {chosen[0]}); a merge needs at least 2")
        _, antiderivative = DECAYS[self.decay]
        first, span = chosen[0], chosen[-1] - chosen[0]
        x = [(step - first) / span for step in chosen]
        multipliers = [
            (antiderivative(b) - antiderivative(a)) / (b - a) for a, b in zip(x, x[1:])
        ]  # W_1 .. W_k, decreasing from below 1 to above 0
        merge = [1 - multipliers[0]]
        merge += [w - w_next for w, w_next in zip(multipliers, multipliers[1:])]
        merge.append(multipliers[-1])
        return nonzero(dict(zip(chosen, merge)))

    def label(self) -> str:
        return f"wsm-{self.decay}{self._window_label()}"

    def describe(self) -> str:
        return f"WSM merge emulating a {self.decay} learning-rate decay over {self._window_words()}"
