"""Fault injection for the reliability tests: named points in the write path where a test can kill the process.

Inert in production: unless the environment variable `BEMA_OFFLINE_FAULT` is set (or a test calls `arm`),
`fault_point` returns at once. The points are:

| point | where |
|---|---|
| `lock` | the output lock was just taken |
| `staging` | the staging folder is ready (fresh or resumed) |
| `read` | before each positioned read of input data |
| `write` | before each positioned write of output data |
| `shard-created` | a shard file was created at its final size, with its header |
| `shard-done` | a finished shard was flushed and recorded for `--resume` |
| `index` | an output folder's shards and index are complete |
| `sidecars` | config, tokenizer, provenance and card were written to an output folder |
| `publish` | just before the staging folder is renamed to the output |
| `renamed` | just after that rename |
| `unlock` | just before the lock file is removed |

`BEMA_OFFLINE_FAULT=POINT:N:ACTION` acts at the N-th time the process passes POINT. ACTION is one of
`kill` (SIGKILL), `int` (SIGINT, as Ctrl-C), `stop` (SIGSTOP, so a test can run something while this process
holds its place), `enospc` and `eio` (an `OSError` as a full disk or a failing disk would raise).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections import Counter

ENV = "BEMA_OFFLINE_FAULT"
POINTS = (
    "lock",
    "staging",
    "read",
    "write",
    "shard-created",
    "shard-done",
    "index",
    "sidecars",
    "publish",
    "renamed",
    "unlock",
)
ACTIONS = ("kill", "int", "stop", "enospc", "eio")

_lock = threading.Lock()
_armed: tuple[str, int, str] | None = None
_counts: Counter | None = None


def arm(point: str, hit: int, action: str = "kill") -> None:
    """Act (`action`) the `hit`-th time the process passes `point`; also counts every point passed."""
    global _armed, _counts
    if point not in POINTS or action not in ACTIONS or hit < 1:
        raise ValueError(f"bad fault {point}:{hit}:{action}; points {', '.join(POINTS)}, actions {', '.join(ACTIONS)}")
    _armed, _counts = (point, hit, action), Counter()


def count_only() -> None:
    """Count the points passed (read back with `counts()`) without acting on any."""
    global _armed, _counts
    _armed, _counts = None, Counter()


def disarm() -> None:
    """Back to inert."""
    global _armed, _counts
    _armed, _counts = None, None


def counts() -> dict[str, int]:
    return dict(_counts or {})


def fault_point(name: str) -> None:
    """Mark a point of the write path; does nothing unless a fault is armed."""
    if _counts is None:
        return
    with _lock:  # points are passed by several threads (engine workers, the shard flusher)
        _counts[name] += 1
        if _armed is None or _armed[0] != name or _counts[name] != _armed[1]:
            return
    action = _armed[2]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code))


def environment_error() -> str | None:
    """Why `BEMA_OFFLINE_FAULT` could not be used, if it is set and malformed (the command line refuses to run)."""
    return _environment_error


def _arm_from_environment() -> str | None:
    """Arm the fault the environment names; a malformed one is reported by `environment_error`, not raised at import."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError(spec)
        point, hit, action = (parts + ["kill"])[:3]
        arm(point, int(hit), action)
    except ValueError:
        return (
            f"{ENV}={spec!r} is not POINT:N[:ACTION] (points {', '.join(POINTS)}; actions {', '.join(ACTIONS)}); "
            "unset it: it is for the tool's own fault-injection tests"
        )
    return None


_environment_error = _arm_from_environment()
