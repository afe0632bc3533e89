"""Real SIGKILLs of an iterative run at chosen points, in a forked child, for the resume tests of `iterate`."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from bema_offline.train.iterate import IteratePlan, run_rounds


def killed_child(plan: IteratePlan, arm: Callable[[], None]) -> None:
    """Run the plan in a forked child that `arm` sets up to SIGKILL itself at one point; check that it died so."""
    pid = os.fork()
    if pid == 0:  # the child: it must never return into pytest
        try:
            arm()
            run_rounds(plan, log=lambda line: None)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child was not killed (status {status})"


def kill_at_training_step(step: int) -> Callable[[], None]:
    """An `arm` that kills the child at its `step`-th call of `DPOTrainer.training_step`, counted over every round it
    trains (before that step's update)."""

    def arm() -> None:
        from trl import DPOTrainer

        original, calls = DPOTrainer.training_step, []

        def training_step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)

        DPOTrainer.training_step = training_step

    return arm
