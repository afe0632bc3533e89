"""Several processes, one output: `torchrun --nnodes N --nproc-per-node M -m bema_offline average ...`.

Every rank plans the same run from the same files (on a filesystem all nodes share). The output shards are laid
out exactly as a single-process run lays them out: the layout depends on the tensors and `--max-shard-size` only,
never on the number of ranks, so the output is byte-identical whatever the launch. Each rank owns whole shards,
balanced by bytes, and computes them for every output folder from one read of its share of every checkpoint.

Rank 0 holds the output lock and prepares the staging folder. When every rank has flushed its shards, rank 0
writes the indexes, the sidecar files, the model cards and the provenance, verifies, and publishes with one rename.

The ranks exchange their status after each phase. An error on any rank makes every rank raise (rank 0 discards
the staging folder), so that all exit with the same one-line message. A rank that dies outright is torchrun's to
handle: it stops the others.

The processes talk through gloo, over TCP, even with `--device cuda`: they only exchange a few small Python
objects, which needs no GPU, and NCCL would add nothing but a GPU dependency to every barrier.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import BemaError, DataError, UsageError

T = TypeVar("T")
# Ranks wait for the slowest one at each barrier; a rank that dies is stopped by torchrun, not by this timeout.
TIMEOUT = datetime.timedelta(hours=24)


class RankFailed(DataError):
    """Another rank failed; its message says which and why."""


@dataclass
class Share:
    """This process's place in a distributed run.

    Args:
        rank (`int`): this process's rank, 0 to `world_size - 1`.
        world_size (`int`): the number of processes.
        local_rank (`int`): the rank on this node (it picks the GPU with `--device cuda`).
        owns_group (`bool`): whether `join` created the process group (and `close` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self, phase: str, error: BaseException | None = None, value: object = None) -> list:
        """Exchange every rank's status after `phase` (and a value); raise if any rank failed.

        Returns:
            `list`: the value of every rank, by rank.
        """
        import torch.distributed as dist

        status = None if error is None else _describe(error)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (status, value))
        if error is not None:
            raise error
        failed = [(rank, status) for rank, (status, _) in enumerate(gathered) if status is not None]
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} of {self.world_size} failed while {phase}: {message}")
        return [value for _, value in gathered]

    def run(self, phase: str, work: Callable[[], T], *, main_only: bool = False) -> T | None:
        """Run `work` (on rank 0 only if `main_only`), then `sync`; every rank raises if it failed anywhere."""
        result, error = None, None
        if self.is_main or not main_only:
            try:
                result = work()
            except BaseException as e:  # noqa: BLE001 - re-raised by sync, after the other ranks heard of it
                error = e
        self.sync(phase, error)
        return result

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def _describe(error: BaseException) -> str:
    if isinstance(error, (BemaError, OSError)):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}"


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join() -> Share | None:
    """Join the run's process group (gloo) if this process is one of several ranks; None for a single process.

    An already initialized default group (a script that set up torch.distributed itself) is used as it is.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        return Share(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    if not launched():
        return None
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UsageError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; "
            "start the ranks with torchrun, or unset WORLD_SIZE for a single process"
        )
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run a single process")
    dist.init_process_group("gloo", timeout=TIMEOUT)
    return Share(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0), owns_group=True)


def assign_shards(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Give each rank whole shards, balanced by bytes: largest first, each to the least loaded rank.

    Args:
        sizes (`dict[str, int]`): bytes of each shard, by shard name.
        world_size (`int`): the number of ranks.

    Returns:
        `list[list[str]]`: the shards of each rank, in name order (some ranks get none when there are few shards).

    Example:

    ```python
    >>> assign_shards({"a": 5, "b": 4, "c": 3, "d": 3}, 2)
    [['a', 'd'], ['b', 'c']]
    ```
    """
    loads = [0] * world_size
    owned: list[list[str]] = [[] for _ in range(world_size)]
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owned[rank].append(name)
        loads[rank] += size
    return [sorted(names) for names in owned]


def plan_digest(plan) -> str:
    """What every rank must agree on before writing: the sources, tensors and outputs of the plan."""
    digest = hashlib.sha256()
    for step, source in sorted(plan.sources.items()):
        digest.update(f"{step}:{source.folder.resolve()}\n".encode())
    for info in plan.tensors:
        digest.update(f"{info.name}:{info.dtype}:{info.shape}:{plan.output_dtypes[info.name]}\n".encode())
    for out in plan.outputs:
        digest.update(f"{out.schedule_index}:{out.kind}:{out.step}:{out.relpath}:{sorted(out.weights.items())}\n".encode())
    return digest.hexdigest()
