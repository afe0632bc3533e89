"""The streaming engine: replay the BEMA/EMA recurrences group by group, reading each input byte once.

The tensors are cut into slices and packed into groups, each small enough for the CPU's cache (`CACHE_BYTES` per
worker) and for `--max-memory`. A group goes one of two ways:

- replayed by the C kernel (float32 or bf16 in and out, float32 state, on the CPU: nearly every model): a worker
  reads the group's bytes at every step with `pread`, then one `kernels.Program` runs every EMA update and every
  output, block by block, so that each block of every EMA stays in L1 from the first step to the last. The EMAs
  never exist in memory; a sweep of many configs costs arithmetic and output bytes only;
- step by step on torch's ops (fp16, fp64, `--accum-dtype float64`, mixed groups, GPUs, no C compiler): for each
  step in order, the worker reads the group's bytes, advances every EMA, and writes the outputs due. State is θ0
  (one per distinct `update_after`) and one EMA per distinct schedule, for the group in hand.

Either way the arithmetic is TRL's, op for op, with its rounding (the kernel's bits are torch's; tests compare
both with each other and with TRL):

    ema.mul_(1 - beta).add_(theta_t, alpha=beta)
    bema = ema + alpha * (theta_t - theta0)

Elementwise ops give the same bits on any slicing, so the result depends neither on the budget nor on the
number of workers, nor on the way a group goes.

Speed comes from a few choices, each measured (docs/benchmarks.md):

- the replay above: memory traffic is the input bytes and the output bytes;
- a run made only of replayed groups never imports torch, whose import alone took longer than averaging a 1 GiB
  model from 8 checkpoints;
- every buffer a worker needs lives in one arena allocated once and reused for every group;
- several workers (threads; torch and the kernel release the GIL) each take whole groups, so reading and
  arithmetic of different groups overlap on different cores.

A tensor that is bit-identical in every source read (a frozen parameter; decided per whole tensor before anything
is computed, see `frozen.py`) is copied unchanged. Non-float tensors are copied from the output step's checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import DTYPES, FLOAT_DTYPES
from ..errors import DataError, UsageError
from ..files import OpenFiles, writable_view
from ..sources.run import BASE_STEP, WeightSource
from . import kernels
from .frozen import frozen_tensors
from .kernels import KERNEL_DTYPES, Floats, kernel_name
from .plan import Plan
from .program import make_program
from .workqueue import WorkQueue

if TYPE_CHECKING:
    import torch

MIN_MEMORY = 4096
# Working memory per worker when --max-memory allows more: small enough to stay in this kind of CPU's cache
# (1 MiB L2 and 32 MiB L3 here) across the steps of a group, large enough that per-op overhead is negligible.
CACHE_BYTES = 8 * 2**20
_ALIGN = 64
_SCRATCH = 3  # accumulation-dtype buffers besides the state: the upcast input, θ_t − θ0, and one more
REPLAY_BLOCK = 512  # the C kernel's block: a replayed group holds at least this many elements


@dataclass(frozen=True, slots=True)
class Slice:
    """Elements [start, stop) of one tensor, flattened."""

    name: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


class Sink:
    """Where output slices go. `write(output_index, slice, data)`: `data` holds the slice's bytes in the output
    dtype, and is only valid during the call. The engine calls it for one output from one thread at a time
    (different outputs may be written from different threads at once), or from any thread at any time if
    `concurrent` is True."""

    concurrent = False

    def write(self, output_index: int, piece: Slice, data: memoryview) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass(frozen=True)
class _Kind:
    """What a group holds: float slices averaged in `accum` and written as `out`, or non-float slices copied
    (safetensors dtype names). Groups the C kernel replays (`steps`: each read step's input dtype, float32 or bf16)
    hold every step's bytes at once; the others go step by step on torch's ops."""

    accum: str | None  # None: copied, not averaged
    out: str
    steps: tuple[str, ...] | None = None
    frozen: bool = False  # copied from any source (they are all the same), cast to `out` if needed


@dataclass(frozen=True)
class _Counts:
    """What a run keeps per element of a group, besides the input: θ0 snapshots, slots (EMAs and sums) and
    outputs."""

    theta0: int
    emas: int
    outputs: int

    @classmethod
    def of(cls, plan: Plan) -> _Counts:
        program = make_program(plan)
        return cls(len(program.theta0_steps), program.slots, len(plan.outputs))


def accumulation_dtype(input_dtype: str, accum_dtype: str) -> str:
    """The wider of the requested accumulation dtype and the input's (fp64 checkpoints stay fp64); safetensors
    names of float dtypes."""
    return "F64" if "F64" in (input_dtype, accum_dtype) else accum_dtype


def default_threads() -> int:
    """The cores this process may run on (at most 8: beyond that the memory bus, not the cores, is the limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _kind(steps: tuple[str, ...], out: str, accum_dtype: str, counts: _Counts, *, replay_budget: int | None, frozen: bool) -> _Kind:
    """The kind of a tensor whose dtype at each read step is `steps`, written as `out`. A frozen tensor (see
    `frozen.py`) and a non-float one are copied. With a `replay_budget` (the C kernel runs; a group's budget in
    bytes), a float32 or bf16 tensor averaged in float32 and written as float32 or bf16 is replayed, if a group of
    one kernel block of it fits the budget with every step's bytes (else, with thousands of checkpoints or a tiny
    budget, it goes step by step)."""
    if frozen or not DTYPES[steps[-1]].is_float:
        return _Kind(None, out, frozen=frozen)
    accum = accumulation_dtype(steps[-1], accum_dtype)
    replayed = _Kind(accum, out, steps)
    if replay_budget is not None and accum == "F32" and out in KERNEL_DTYPES and set(steps) <= set(KERNEL_DTYPES):
        per_element, slack = _element_cost(replayed, counts, read_size=0)
        if per_element * REPLAY_BLOCK + slack <= replay_budget:
            return replayed
    return _Kind(accum, out)


def _element_cost(kind: _Kind, counts: _Counts, *, read_size: int) -> tuple[int, int]:
    """The arena bytes per element of a group of this kind, and the alignment slack on top (see `_arena_bytes`)."""
    out_size = DTYPES[kind.out].itemsize
    if kind.steps is not None:
        per_element = sum(DTYPES[dtype].itemsize for dtype in kind.steps) + 4 * counts.theta0 + out_size * counts.outputs
        return per_element, 8 + 64 * (len(kind.steps) + counts.theta0 + counts.outputs)
    per_element = read_size + DTYPES[kind.accum].itemsize * (counts.theta0 + counts.emas + _SCRATCH) + out_size
    return per_element, 8 + 64 * (counts.theta0 + counts.emas + _SCRATCH + 2)


def _arena_bytes(kind: _Kind, counts: _Counts, *, read: int, numel: int, slices: int) -> int:
    """The arena a group needs, each buffer 64-byte aligned. Replayed: every step's bytes, the θ0 snapshots and
    every output. Step by step: the read buffer (slices of mixed dtypes 8-byte aligned), and for float groups θ0,
    the EMAs, the upcast input, two scratch buffers and the cast output."""
    out = _align(numel * DTYPES[kind.out].itemsize)
    if kind.steps is not None:
        return sum(_align(numel * DTYPES[dtype].itemsize) for dtype in kind.steps) + counts.theta0 * _align(4 * numel) + counts.outputs * out
    read_part = _align(read + 8 * slices)
    if kind.accum is None:
        return read_part + (out if kind.frozen else 0)  # a frozen tensor may be cast to another --dtype
    return read_part + (counts.theta0 + counts.emas + _SCRATCH) * _align(numel * DTYPES[kind.accum].itemsize) + out


def group_slices(
    plan: Plan,
    *,
    max_memory: int,
    accum_dtype: str,
    cache_bytes: int | None = None,
    replay: bool = False,
    frozen: Collection[str] = (),
) -> list[list[Slice]]:
    """Cut the tensors into slices and pack them into groups whose working memory fits a budget.

    The working memory of a group counts θ0 (one per distinct `update_after` of the replays) and the slots (one per
    distinct EMA, see `program.ema_slots`, and one per weighted output), so a sweep of many configs gets smaller
    groups within the same budget.

    Args:
        plan (`Plan`): the run.
        max_memory (`int`): working-memory budget of one group, in bytes.
        accum_dtype (`str`): the requested accumulation dtype, "float32" or "float64".
        cache_bytes (`int`, *optional*): a smaller budget to use when `max_memory` is larger (see `CACHE_BYTES`).
        replay (`bool`, defaults to False): the C kernel runs, and replays the tensors it covers (see `_Kind`).
        frozen (`Collection[str]`, defaults to none): the frozen tensors, copied (see `frozen.py`).

    Returns:
        `list[list[Slice]]`: groups in file order; the slices of a group share a kind (float or not, and dtypes).
    """
    packed = _pack(plan, max_memory=max_memory, accum_dtype=accum_dtype, cache_bytes=cache_bytes, replay=replay, frozen=frozen)
    return [group for _, group in packed]


def _pack(
    plan: Plan, *, max_memory: int, accum_dtype: str, cache_bytes: int | None, replay: bool, frozen: Collection[str]
) -> list[tuple[_Kind, list[Slice]]]:
    """`group_slices`, each group with its kind."""
    if max_memory < MIN_MEMORY:
        raise UsageError(f"--max-memory {max_memory} bytes is too small; give at least {MIN_MEMORY} bytes")
    accum_dtype = FLOAT_DTYPES[accum_dtype]
    budget = max_memory if cache_bytes is None else min(max_memory, cache_bytes)
    counts = _Counts.of(plan)
    sources = [plan.sources[step] for step in plan.read_steps]
    groups: list[tuple[_Kind, list[Slice]]] = []
    open_groups: dict[_Kind, tuple[list[Slice], int, int]] = {}  # kind -> (slices, read bytes, elements)
    costs: dict[tuple, tuple[_Kind, _Kind, int, int, int]] = {}  # a tensor's dtypes -> its kind and costs (computed once)
    for info in plan.tensors:
        steps = tuple(source.tensors[info.name].dtype for source in sources)
        key = (steps, plan.output_dtypes[info.name], info.name in frozen)
        if key not in costs:
            kind = _kind(steps, key[1], accum_dtype, counts, replay_budget=budget if replay else None, frozen=key[2])
            # copied tensors are packed as if averaged, so that every group's buffers fit the same arena
            packing = kind if kind.accum is not None else _Kind(accum_dtype, kind.out)
            read_size = max(DTYPES[dtype].itemsize for dtype in steps)
            costs[key] = (kind, packing, read_size, *_element_cost(packing, counts, read_size=read_size))  # (one slice always fits the slack)
        kind, packing, read_size, per_element, slack = costs[key]
        per_slice = (budget - slack) // per_element
        if per_slice < 1:
            raise UsageError(
                f"--max-memory {max_memory} bytes is too small for {len(plan.schedules)} configs; "
                f"give at least {slack + per_element} bytes per worker"
            )
        group, read, numel = open_groups.get(kind, ([], 0, 0))
        for start in range(0, max(info.numel, 1), per_slice):
            piece = Slice(info.name, start, min(start + per_slice, info.numel))
            need = _arena_bytes(packing, counts, read=read + piece.numel * read_size, numel=numel + piece.numel, slices=len(group) + 1)
            if group and need > budget:
                groups.append((kind, group))
                group, read, numel = [], 0, 0
            group.append(piece)
            read += piece.numel * read_size
            numel += piece.numel
        open_groups[kind] = (group, read, numel)
    groups.extend((kind, group) for kind, (group, _, _) in open_groups.items() if group)
    return groups


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Worker:
    """One worker's files and arenas: byte buffers, allocated once, that hold every buffer a group needs, handed
    out as byte offsets by `take`.

    On the CPU one arena holds everything: an anonymous memory map, which the kernel reads by address and torch
    (where a group needs it) through a tensor over the same bytes. With a GPU (`staged`), the state lives in a
    device arena, and the read buffer and the cast output in a host arena (pinned, for fast copies), from which
    bytes are copied over.
    """

    def __init__(self, arena_bytes: int, *, device: str, staged: bool, identities: dict) -> None:
        # every input file may stay open (a sharded FSDP or DeepSpeed checkpoint spreads each tensor over every rank's
        # file), within the process's limit on descriptors, shared by the workers
        self.files = OpenFiles(identities=identities, max_open=open_files_per_worker(len(identities)))
        self.staged = staged
        size = max(arena_bytes, _ALIGN)
        if staged:
            import torch

            self.arena = torch.empty(size, dtype=torch.uint8, device=device)
            self.host = torch.empty(size, dtype=torch.uint8, pin_memory=device.startswith("cuda"))
            self.host_bytes = writable_view(self.host)
            self.host_address = self.host.data_ptr()
        else:
            self._memory = mmap.mmap(-1, size)
            self._exported = ctypes.c_char.from_buffer(self._memory)  # pins the map while its address is in use
            self.host_bytes = memoryview(self._memory)
            self.host_address = ctypes.addressof(self._exported)
            self.arena = self.host = None  # tensors over the map, made when a group first needs torch
        self.used = self.host_used = 0

    def take(self, nbytes: int) -> int:
        """The offset of the next `nbytes` of the (device) arena, 64-byte aligned; `reset()` frees them all."""
        if not self.staged:
            return self.take_host(nbytes)
        offset = self.used
        self.used += _align(nbytes)
        return offset

    def take_host(self, nbytes: int) -> int:
        """The offset of the next `nbytes` of the host arena (the same arena without a GPU)."""
        offset = self.host_used
        self.host_used += _align(nbytes)
        return offset

    def reset(self) -> None:
        self.used = self.host_used = 0

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes of the host arena."""
        return self.host_bytes[offset : offset + nbytes]

    def floats(self, offset: int, numel: int, *, bf16: bool = False) -> Floats:
        """float32 (or bf16) values in the host arena, for the kernel."""
        return Floats(self.host_address + offset, numel, bf16)

    def tensor(self, offset: int, nbytes: int, dtype: str, *, host: bool = False) -> torch.Tensor:
        """A torch view of bytes of the device arena (or of the host arena)."""
        if self.arena is None:
            import torch

            self.arena = self.host = torch.frombuffer(self._memory, dtype=torch.uint8)
        arena = self.host if host else self.arena
        return arena[offset : offset + nbytes].view(DTYPES[dtype].torch)


def open_files_per_worker(files: int, workers: int = 8) -> int:
    """How many input files one worker keeps open: all of them, when the soft limit on descriptors allows it for
    every worker with room to spare, else its share (least recently used ones are closed and reopened)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    share = (soft - 64) // (workers + 1) if soft != resource.RLIM_INFINITY else files
    return max(16, min(files, share))


def check_device(device: str) -> str:
    """The device for the arithmetic ("cpu", "cuda" or "cuda:N"), refused in one line when it cannot be used.
    torch is imported only for a GPU.

    Raises:
        `UsageError`: not a device name, or CUDA (or that GPU) is not available.
    """
    if str(device) == "cpu":
        return "cpu"
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise UsageError(f"--device {parsed}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UsageError(
            f"--device {parsed}: torch sees no CUDA GPU here (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda or 'no'}); use --device cpu"
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"--device {parsed}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return str(parsed)


@dataclass(frozen=True)
class _Layout:
    """Where a group's bytes lie at one step, and where they go in the read buffer."""

    ranges: list[tuple[Path, int, int, int]]  # coalesced (path, file offset, buffer offset, nbytes)
    nbytes: int  # of the read buffer
    offsets: list[int]  # each slice's offset in the read buffer
    dtypes: list[str]  # each slice's dtype at this step
    numels: list[int]
    dtype: str | None  # the slices' common dtype (they then lie back to back), or None

    @classmethod
    def of(cls, source: WeightSource, group: list[Slice]) -> _Layout:
        infos = [source.tensors[piece.name] for piece in group]
        dtypes = [info.dtype for info in infos]
        mixed = len(set(dtypes)) > 1
        ranges: list[tuple[Path, int, int, int]] = []
        offsets = []
        offset = 0
        for piece, info in zip(group, infos):
            if mixed:
                offset = -(-offset // 8) * 8
            offsets.append(offset)
            for path, start, nbytes in info.ranges(piece.start, piece.stop):
                last = ranges[-1] if ranges else None
                if last and last[0] == path and last[1] + last[3] == start and last[2] + last[3] == offset:
                    ranges[-1] = (last[0], last[1], last[2], last[3] + nbytes)
                else:
                    ranges.append((path, start, offset, nbytes))
                offset += nbytes
        return cls(ranges, offset, offsets, dtypes, [p.numel for p in group], None if mixed else dtypes[0])


class Engine:
    """Replays a `Plan` and sends every output slice to a `Sink`.

    Args:
        plan (`Plan`): what to read and write.
        sink (`Sink`): receives output slices.
        accum_dtype (`str`, defaults to "float32"): accumulation dtype, "float32" or "float64" (widened to the
            input's if wider).
        max_memory (`int`): working-memory budget in bytes for tensor data, shared by all workers.
        threads (`int`, *optional*): workers; default one per core (see `default_threads`), one with a GPU.
        device (`str`, defaults to "cpu"): where the arithmetic runs; "cuda" keeps the state on the GPU and copies
            each step's bytes over (the reads stay on the CPU).
        on_progress (`Callable[[int, int], None]`, optional): called with (bytes read, tensors finished).
        fused (`bool`, defaults to True): replay the groups the C kernel covers on it (see `kernels`); False runs
            torch's ops, step by step, everywhere. The bits are the same.
        frozen (`Collection[str]`, *optional*): the tensors to copy as frozen, as a run decided them (`verify`
            recomputes an output with its record's); default: decided here over the plan's sources (`frozen.py`).
    """

    def __init__(
        self,
        plan: Plan,
        sink: Sink,
        *,
        accum_dtype: str = "float32",
        max_memory: int,
        threads: int | None = None,
        device: str = "cpu",
        on_progress: Callable[[int, int], None] | None = None,
        fused: bool = True,
        frozen: Collection[str] | None = None,
    ) -> None:
        self.plan = plan
        self.sink = sink
        self.device = check_device(device)
        self.staged = self.device != "cpu"
        threads = threads or (1 if self.staged else default_threads())
        self.threads = max(1, min(threads, max_memory // MIN_MEMORY))
        # a GPU has no CPU cache to fit, and wants large ops: groups then use the whole budget
        cache_bytes = None if self.staged else CACHE_BYTES
        self.fused = fused and not self.staged and kernel_name() is not None
        if frozen is not None:
            self.frozen = {info.name for info in plan.tensors if info.name in frozen}
        else:
            with OpenFiles(identities=plan.identities) as files:
                self.frozen = frozen_tensors(plan.sources.values(), [info.name for info in plan.tensors], files, max_memory=max_memory)
        packed = _pack(
            plan, max_memory=max_memory // self.threads, accum_dtype=accum_dtype, cache_bytes=cache_bytes, replay=self.fused,
            frozen=self.frozen,
        )
        self.kinds = [kind for kind, _ in packed]
        self.groups = [group for _, group in packed]
        self.threads = max(1, min(self.threads, len(self.groups)))
        self.program = make_program(plan)
        self.last_slice = {}
        for group in self.groups:
            for piece in group:
                self.last_slice[piece.name] = piece
        counts = _Counts.of(plan)
        self.arena_bytes = max((self._arena_need(group, kind, counts) for group, kind in zip(self.groups, self.kinds)), default=0)
        self._output_locks = [threading.Lock() for _ in plan.outputs]  # one writer per output at a time
        self._concurrent_sink = getattr(sink, "concurrent", False)
        self.queue = WorkQueue(len(self.groups), on_progress)

    @property
    def uses_torch(self) -> bool:
        """Whether any float group takes torch's ops (else the run never imports torch)."""
        return any(kind.accum is not None and kind.steps is None for kind in self.kinds)

    # --- running ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Process every group, on `threads` workers; re-raise the first error any worker met."""
        torch_threads = None
        if self.uses_torch or self.staged:
            import torch

            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)  # workers, not intra-op threads: OpenMP barriers stall when cores are shared
        workers = [_Worker(self.arena_bytes, device=self.device, staged=self.staged, identities=self.plan.identities) for _ in range(self.threads)]
        threads = [threading.Thread(target=self._work, args=(w,), name=f"bema-worker-{i}", daemon=True) for i, w in enumerate(workers[1:])]
        try:
            for thread in threads:
                thread.start()
            self._work(workers[0])
        except BaseException as e:  # Ctrl-C in the main thread: stop the others too
            self.queue.fail(e)
        finally:
            for thread in threads:
                thread.join()
            for worker in workers:
                worker.files.close()
            if torch_threads is not None:
                torch.set_num_threads(torch_threads)
        self.queue.raise_error()

    def _work(self, worker: _Worker) -> None:
        try:
            while (index := self.queue.take()) is not None:
                worker.reset()
                group, kind = self.groups[index], self.kinds[index]
                if kind.accum is None:
                    self._copy_group(group, kind, worker)
                elif kind.steps is not None:
                    self._replay(group, kind, worker)
                else:
                    self._average_on_torch(group, kind, worker)
                finished = sum(1 for piece in group if self.last_slice[piece.name] == piece)
                self.queue.progress(0, finished)
        except BaseException as e:
            self.queue.fail(e)

    # --- one group -------------------------------------------------------------------------------------------

    def _arena_need(self, group: list[Slice], kind: _Kind, counts: _Counts) -> int:
        read = sum(p.numel * max(s.tensors[p.name].itemsize for s in self.plan.sources.values()) for p in group)
        return _arena_bytes(kind, counts, read=read, numel=sum(p.numel for p in group), slices=len(group))

    def _layouts(self, group: list[Slice]) -> dict[int, _Layout]:
        return {step: _Layout.of(self.plan.sources[step], group) for step in self.plan.read_steps}

    @staticmethod
    def _bounds(group: list[Slice]) -> list[tuple[int, int]]:
        """Each slice's [start, stop) in the group's element space."""
        bounds = []
        for piece in group:
            start = bounds[-1][1] if bounds else 0
            bounds.append((start, start + piece.numel))
        return bounds

    def _replay(self, group: list[Slice], kind: _Kind, worker: _Worker) -> None:
        """A group on the C kernel alone: every step's bytes are read, then one `kernels.Program` computes every
        output, block by block (θ_t is never upcast in memory, and the EMAs never leave the CPU's L1)."""
        layouts = self._layouts(group)
        bounds = self._bounds(group)
        numel = bounds[-1][1]
        thetas = {}
        for step, dtype in zip(self.plan.read_steps, kind.steps):
            offset = worker.take(layouts[step].nbytes)
            self._read(layouts[step], offset, worker)
            thetas[step] = worker.floats(offset, numel, bf16=dtype == "BF16")
        ops = self.program
        theta0 = {}
        for step in ops.theta0_steps:
            theta0[step] = worker.floats(worker.take(4 * numel), numel)
            kernels.upcast(thetas[step], theta0[step])
        out_bytes = numel * DTYPES[kind.out].itemsize
        outs = {index: worker.take(out_bytes) for index in range(len(self.plan.outputs))}
        index_of = {step: i for i, step in enumerate(self.plan.read_steps)}
        program = kernels.Program([thetas[step] for step in self.plan.read_steps], slots=ops.slots)
        written = []  # (output index, its values)
        for step in self.plan.read_steps:
            for slot in ops.starts.get(step, ()):
                program.start(slot, theta0[step])
            for slot, beta in ops.updates.get(step, ()):
                program.update(slot, index_of[step], beta)
            for term in ops.sums.get(step, ()):
                (program.scale if term.first else program.accumulate)(term.slot, index_of[step], term.weight)
            for op in ops.outputs.get(step, ()):
                out = worker.floats(outs[op.index], numel, bf16=kind.out == "BF16")
                tau = theta0[op.theta0_step] if op.alpha is not None else None
                program.output(op.slot, index_of[step], tau, op.alpha, out)
                written.append((op.index, out))
        for (output_index, out), finite in zip(written, program.run(), strict=True):
            if not finite:
                self._raise_non_finite(group, lambda i: kernels.all_finite(out.part(*bounds[i])), worker)
            self._emit(output_index, self._split(group, bounds, worker.view(outs[output_index], out_bytes), kind.out))

    def _average_on_torch(self, group: list[Slice], kind: _Kind, worker: _Worker) -> None:
        """A group on torch's ops, TRL's op for op: any float dtypes, mixed groups, and GPUs."""
        import torch

        layouts = self._layouts(group)
        bounds = self._bounds(group)
        numel = bounds[-1][1]
        read_bytes = max(layout.nbytes for layout in layouts.values())
        read = worker.take_host(read_bytes)
        raw = worker.take(read_bytes) if worker.staged else read  # the bytes where the arithmetic runs
        state_bytes = numel * DTYPES[kind.accum].itemsize

        def state() -> torch.Tensor:
            return worker.tensor(worker.take(state_bytes), state_bytes, kind.accum)

        ops = self.program
        xa = state()
        theta0 = {step: state() for step in ops.theta0_steps}
        slots = [state() for _ in range(ops.slots)]
        diff, scratch = state(), state()
        out_bytes = numel * DTYPES[kind.out].itemsize
        out_offset = worker.take(out_bytes)
        out = worker.tensor(out_offset, out_bytes, kind.out)
        out_host_offset = worker.take_host(out_bytes) if worker.staged else out_offset
        for step in self.plan.read_steps:
            layout = layouts[step]
            self._read(layout, read, worker)
            if worker.staged:
                worker.tensor(raw, layout.nbytes, "U8").copy_(worker.tensor(read, layout.nbytes, "U8", host=True))
            x = self._upcast(layout, raw, worker, into=theta0.get(step, xa))
            if step in theta0:
                if x.data_ptr() != theta0[step].data_ptr():
                    theta0[step].copy_(x)
                for slot in ops.starts.get(step, ()):
                    slots[slot].copy_(theta0[step])
            for slot, beta in ops.updates.get(step, ()):
                slots[slot].mul_(1 - beta).add_(x, alpha=beta)
            for term in ops.sums.get(step, ()):
                if term.first:
                    torch.mul(x, term.weight, out=slots[term.slot])
                else:
                    slots[term.slot].add_(x, alpha=term.weight)
            diff_of = None  # the θ0 step whose θ_t − θ0 `diff` holds (outputs sharing θ0 share it)
            for op in ops.outputs.get(step, ()):
                if op.alpha is None:  # an EMA or a weighted sum, as it stands
                    value = slots[op.slot]
                else:  # ema + alpha * (x - theta0), op for op
                    if diff_of != op.theta0_step:
                        torch.sub(x, theta0[op.theta0_step], out=diff)
                        diff_of = op.theta0_step
                    value = torch.mul(diff, op.alpha, out=scratch).add_(slots[op.slot])
                if not fits(value, kind.out):
                    self._raise_non_finite(group, lambda i: fits(value[slice(*bounds[i])], kind.out), worker)
                out.copy_(value)
                if not all_finite(out):
                    self._raise_non_finite(group, lambda i: all_finite(out[slice(*bounds[i])]), worker)
                if worker.staged:
                    worker.tensor(out_host_offset, out_bytes, kind.out, host=True).copy_(out)
                self._emit(op.index, self._split(group, bounds, worker.view(out_host_offset, out_bytes), kind.out))

    def _copy_group(self, group: list[Slice], kind: _Kind, worker: _Worker) -> None:
        """Copied tensors: a non-float tensor as it is at each output's step; a frozen one (the same in every source)
        read once, and cast when the output dtype differs (`--dtype`), for every output."""
        layouts = self._layouts(group)
        read = worker.take_host(max(layout.nbytes for layout in layouts.values()))
        for step in self.plan.read_steps[-1:] if kind.frozen else self.program.output_steps:
            layout = layouts[step]
            self._fill(layout, read, worker)
            pieces = [
                (piece, worker.view(read + offset, piece.numel * DTYPES[dtype].itemsize))
                for piece, offset, dtype in zip(group, layout.offsets, layout.dtypes)
            ]
            if any(dtype != kind.out for dtype in layout.dtypes):
                pieces = self._cast(pieces, layout, read, kind.out, worker)
            for output_index, out in enumerate(self.plan.outputs):
                if kind.frozen or out.step == step:
                    self._emit(output_index, pieces)
        # counted as read at every step, so that progress adds up to the plan's total
        self.queue.progress(sum(layout.nbytes for layout in layouts.values()), 0)

    def _cast(self, pieces: list[tuple[Slice, memoryview]], layout: _Layout, read: int, dtype: str, worker: _Worker) -> list[tuple[Slice, memoryview]]:
        """A frozen group's slices cast to the output dtype (torch's rounding, as the averaged tensors get)."""
        itemsize = DTYPES[dtype].itemsize
        out = worker.take_host(sum(piece.numel for piece, _ in pieces) * itemsize)
        cast, position = [], out
        for (piece, _), offset, source_dtype in zip(pieces, layout.offsets, layout.dtypes):
            nbytes = piece.numel * itemsize
            values = worker.tensor(read + offset, piece.numel * DTYPES[source_dtype].itemsize, source_dtype, host=True)
            target = worker.tensor(position, nbytes, dtype, host=True)
            if not fits(values, dtype) or not all_finite(target.copy_(values)):
                raise DataError(
                    f"tensor {piece.name!r} (frozen: the same in every checkpoint) does not fit in --dtype "
                    f"{DTYPES[dtype].torch_name}; choose a wider --dtype"
                )
            cast.append((piece, worker.view(position, nbytes)))
            position += nbytes
        return cast

    def _emit(self, output_index: int, pieces: list[tuple[Slice, memoryview]]) -> None:
        """Hand output slices (each with its bytes) to the sink: one worker per output at a time, unless the sink is
        concurrent."""
        with contextlib.nullcontext() if self._concurrent_sink else self._output_locks[output_index]:
            for piece, data in pieces:
                self.sink.write(output_index, piece, data)

    @staticmethod
    def _split(group: list[Slice], bounds: list[tuple[int, int]], data: memoryview, dtype: str) -> list[tuple[Slice, memoryview]]:
        """A group's output (`data`, the bytes of every slice back to back), slice by slice."""
        itemsize = DTYPES[dtype].itemsize
        return [(piece, data[start * itemsize : stop * itemsize]) for piece, (start, stop) in zip(group, bounds)]

    # --- reading ---------------------------------------------------------------------------------------------

    def _read(self, layout: _Layout, read: int, worker: _Worker) -> None:
        """Read a group's bytes at one step into the host arena at offset `read`, and count them as read."""
        self._fill(layout, read, worker)
        self.queue.progress(layout.nbytes, 0)

    @staticmethod
    def _fill(layout: _Layout, read: int, worker: _Worker) -> None:
        for path, start, buffer_offset, size in layout.ranges:
            worker.files.read_into(path, start, worker.view(read + buffer_offset, size))

    @staticmethod
    def _upcast(layout: _Layout, raw: int, worker: _Worker, *, into: torch.Tensor) -> torch.Tensor:
        """The group's values (the bytes at arena offset `raw`) in the accumulation dtype: converted into `into`, or
        the raw bytes themselves when the input already has that dtype."""
        if layout.dtype is not None:
            x = worker.tensor(raw, layout.nbytes, layout.dtype)
            return x if x.dtype == into.dtype else into.copy_(x)
        element = 0
        for offset, dtype, numel in zip(layout.offsets, layout.dtypes, layout.numels):
            into[element : element + numel].copy_(worker.tensor(raw + offset, numel * DTYPES[dtype].itemsize, dtype))
            element += numel
        return into

    # --- errors ----------------------------------------------------------------------------------------------

    def _raise_non_finite(self, group: list[Slice], finite: Callable[[int], bool], worker: _Worker) -> None:
        """`finite(i)` says whether the group's values are finite in slice i."""
        for i, piece in enumerate(group):
            if not finite(i):
                self.raise_non_finite(piece, worker.files)
        raise AssertionError("non-finite values in no slice")  # pragma: no cover

    def raise_non_finite(self, piece: Slice, files: OpenFiles) -> None:
        """Name the first step whose input holds NaN or Inf in this tensor, or report an overflow."""
        import torch

        for step in self.plan.read_steps:
            info = self.plan.sources[step].tensors[piece.name]
            buffer = torch.empty(piece.numel * info.itemsize, dtype=torch.uint8)
            view, done = writable_view(buffer), 0
            for path, start, nbytes in info.ranges(piece.start, piece.stop):
                files.read_into(path, start, view[done : done + nbytes])
                done += nbytes
            if info.is_float and not all_finite(buffer.view(info.torch_dtype)):
                at = "in the base model" if step == BASE_STEP else f"at step {step}"
                raise DataError(
                    f"tensor {piece.name!r} has NaN or Inf values {at} ({info.path}); "
                    "the run diverged there: narrow the steps with --max-step, or drop that checkpoint"
                )
        out = DTYPES[self.plan.output_dtypes[piece.name]]
        if out.saturates_beyond is not None:
            raise DataError(
                f"tensor {piece.name!r}: its average has values beyond ±{out.saturates_beyond:g}, which {out.name} cannot "
                "hold (torch would clamp them silently); choose a wider --dtype"
            )
        raise DataError(
            f"averaging tensor {piece.name!r} overflowed to Inf or NaN; try --accum-dtype float64 or another --dtype"
        )


def fits(values: torch.Tensor, dtype: str) -> bool:
    """Whether `values` can be cast to `dtype` without torch clamping them silently (float8 E4M3 has no Inf: its
    cast saturates, even NaN-free overflow and Inf, to ±448). Other dtypes overflow to Inf, which `all_finite`
    catches after the cast."""
    limit = DTYPES[dtype].saturates_beyond
    if limit is None or values.numel() == 0:
        return True
    return bool((values.abs() <= limit).all())


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass without allocating: any Inf or NaN makes the sum non-finite, so a
    finite sum proves it; a non-finite sum may be an overflow of the sum itself, so it is checked exactly."""
    import torch

    if values.numel() == 0:
        return True
    if values.dtype.itemsize == 1:  # float8: no sum, no isfinite
        values = values.float()
    return math.isfinite(float(values.sum())) or bool(torch.isfinite(values).all())
