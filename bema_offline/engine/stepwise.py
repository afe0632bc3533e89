"""The step-major engine: the checkpoints one at a time, in step order, so that only one needs to be on disk.

`Engine` replays group by group and reads every step's bytes of a group at once: every checkpoint must be on disk
for the whole run. This engine turns the loops around, for runs whose checkpoints arrive one by one and leave
(`--no-keep-downloads` on a Hub run): for each step in order it calls `fetch(step)`, then for each group of slices
(within `--max-memory`) it reads the step's bytes and the group's state (each θ0 snapshot, each EMA and each
weighted sum, in the accumulation dtype) from state files, applies that step's ops, writes the outputs due at that
step and the state back; then it calls `release(step)`. Meanwhile the source downloads the next step.

The ops are `Engine`'s, op for op and in the same order, and all are elementwise, so the output has the same bytes
as `Engine`'s (tests/engine/test_stepwise.py compares every byte): the C kernel's `Program` with one step (`start`
a slot from its state, `update`, `scale`, `accumulate`; a slot is stored back with `output(slot, 0, None, None,
state)`, an exact float32 copy) where the kernel covers the dtypes, torch's ops elsewhere.

State on disk costs 4 bytes per element (8 with float64 accumulation) for each θ0, each EMA and each weighted sum;
disk use is then one checkpoint (plus the one being downloaded), the output, and that state.

Frozen tensors (`frozen.py`: bit-identical in every source, copied rather than averaged) cannot be decided before
the last step is read. A float tensor with one dtype in every source starts as a candidate: its bytes at the first
step are kept in a state file, and at each later step it is compared with them, per whole tensor, by bits
(`frozen_tensors`). While it stays equal nothing is computed for it. When it first differs, at step s, every step
before s had exactly the kept bytes, so its state is rebuilt by replaying those steps on the kept bytes (and the
outputs due before s are written then); from s on it is averaged like the rest. What is still a candidate after the
last step is frozen, and copied from the kept bytes, as `Engine` copies it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import DTYPES, FLOAT_DTYPES
from ..errors import DataError, UsageError
from ..files import OpenFiles, check_unchanged
from ..sources.tensors import TensorInfo, WeightSource
from . import kernels
from .engine import CACHE_BYTES, MIN_MEMORY, Sink, Slice, _Layout, _Worker, accumulation_dtype, all_finite, default_threads, fits
from .frozen import frozen_tensors
from .kernels import KERNEL_DTYPES, kernel_name
from .plan import Plan
from .program import make_program

_SCRATCH = 3  # accumulation-dtype buffers besides the state: the upcast input, θ_t − θ0, α·(θ_t − θ0)


@dataclass(frozen=True)
class _Op:
    """One op of a step: `code` "start" (slot from θ0 `arg`), "update" (β `arg`), "scale" or "accumulate" (weight
    `arg`)."""

    code: str
    slot: int
    arg: float


@dataclass(frozen=True)
class _Output:
    index: int
    slot: int
    theta0_step: int | None  # bema: θ0's step (with `alpha`); None writes the slot as it stands
    alpha: float | None


@dataclass(frozen=True)
class _Kind:
    """What a group holds: float slices averaged in `accum` (on the kernel when `kernel`), or non-float ones copied."""

    accum: str | None
    out: str
    kernel: bool = False
    candidate: bool = False  # may be frozen: kept and compared, averaged only once it changes


class StepwiseEngine:
    """Computes a `Plan`'s outputs step by step and sends every output slice to a `Sink`.

    Args:
        plan (`Plan`): what to read and write.
        sink (`Sink`): receives output slices.
        state_dir (`str | Path`): where the state files go (a private folder in it, removed at the end, and the folder
            itself when that leaves it empty; `bema-average` gives `.NAME.bema-state` beside the output).
        accum_dtype (`str`, defaults to "float32"): "float32" or "float64" (widened to the input's if wider).
        max_memory (`int`): working-memory budget in bytes, shared by all workers.
        threads (`int`, *optional*): workers for the groups of a step; default one per core.
        fetch (`Callable[[int], WeightSource]`, *optional*): the source of a step, called once per step in order,
            when its bytes are needed; defaults to the plan's.
        release (`Callable[[int], None]`, *optional*): called once a step has been read for good.
        on_progress (`Callable[[int, int], None]`, *optional*): called with (bytes read, tensors finished).

    Example:

    ```python
    >>> engine = StepwiseEngine(plan, FolderSink(writers), state_dir=staging, max_memory=2**28,
    ...                         fetch=hub.fetch, release=hub.release)
    >>> engine.run()
    ```
    """

    def __init__(
        self,
        plan: Plan,
        sink: Sink,
        *,
        state_dir: str | Path,
        accum_dtype: str = "float32",
        max_memory: int,
        threads: int | None = None,
        fetch: Callable[[int], WeightSource] | None = None,
        release: Callable[[int], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_memory < MIN_MEMORY:
            raise UsageError(f"--max-memory {max_memory} bytes is too small; give at least {MIN_MEMORY} bytes")
        self.plan = plan
        self.sink = sink
        self.state_dir = Path(state_dir)
        self.fetch = fetch or (lambda step: plan.sources[step])
        self.release = release or (lambda step: None)
        self._on_progress = on_progress
        self.steps = plan.read_steps
        self._schedule(accum_dtype)
        self.threads = max(1, min(threads or default_threads(), max_memory // MIN_MEMORY))
        self._pack(min(max_memory // self.threads, CACHE_BYTES))
        self._locks = [threading.Lock() for _ in plan.outputs]  # one writer per output at a time
        self._progress_lock = threading.Lock()
        self._concurrent_sink = getattr(sink, "concurrent", False)

    # --- what happens at each step ----------------------------------------------------------------------------

    def _schedule(self, accum_dtype: str) -> None:
        """`Engine`'s ops (`program.make_program`), by step: EMA starts and updates (replays), scale and accumulate
        (weighted sums), and the outputs."""
        self.accum_dtype = FLOAT_DTYPES[accum_dtype]
        program = make_program(self.plan)
        self.theta0_steps = program.theta0_steps
        self.n_slots = program.slots
        self.ops: dict[int, list[_Op]] = {}
        for step in self.steps:
            ops = [_Op("start", slot, step) for slot in program.starts.get(step, ())]
            ops += [_Op("update", slot, beta) for slot, beta in program.updates.get(step, ())]
            ops += [_Op("scale" if term.first else "accumulate", term.slot, term.weight) for term in program.sums.get(step, ())]
            if ops:
                self.ops[step] = ops
        self.outputs_at = {
            step: [_Output(op.index, op.slot, op.theta0_step if op.alpha is not None else None, op.alpha) for op in ops]
            for step, ops in program.outputs.items()
        }
        self.output_steps = sorted(self.outputs_at)

    def _pack(self, budget: int) -> None:
        """Slices and groups (one kind each, within `budget` bytes of arena), and each float tensor's place in the
        state files."""
        plan = self.plan
        self.n_state = len(self.theta0_steps) + self.n_slots
        sources = [plan.sources[step] for step in self.steps]
        self.kinds: dict[str, _Kind] = {}
        self.state_offset: dict[str, int] = {}
        self.state_bytes = 0
        self.kept_offset: dict[str, int] = {}
        self.kept_bytes = 0
        use_kernel = kernel_name() is not None
        for info in plan.tensors:
            out = plan.output_dtypes[info.name]
            dtypes = [source.tensors[info.name].dtype for source in sources]
            if not info.is_float:
                self.kinds[info.name] = _Kind(None, out)
                continue
            accum = accumulation_dtype(info.dtype, self.accum_dtype)
            kernel = use_kernel and accum == "F32" and out in KERNEL_DTYPES and set(dtypes) <= set(KERNEL_DTYPES) and len(set(dtypes)) == 1
            candidate = len(sources) > 1 and len(set(dtypes)) == 1
            self.kinds[info.name] = _Kind(accum, out, kernel, candidate)
            self.state_offset[info.name] = self.state_bytes
            self.state_bytes += info.numel * DTYPES[accum].itemsize
            if candidate:
                self.kept_offset[info.name] = self.kept_bytes
                self.kept_bytes += info.nbytes
        self.groups: list[tuple[_Kind, list[Slice]]] = []
        open_groups: dict[tuple, tuple[list[Slice], int]] = {}
        self.arena_bytes = 0
        for info in plan.tensors:
            kind = self.kinds[info.name]
            read = max(source.tensors[info.name].itemsize for source in sources)
            per_element, slack = self._cost(kind, read)
            per_slice = (budget - slack) // per_element
            if per_slice < 1:
                raise UsageError(f"--max-memory is too small for {self.n_state} state buffers; give at least {slack + per_element} bytes per worker")
            key = (kind, tuple(source.tensors[info.name].dtype for source in sources), read)
            group, numel = open_groups.get(key, ([], 0))
            for start in range(0, max(info.numel, 1), per_slice):
                piece = Slice(info.name, start, min(start + per_slice, info.numel))
                if group and (numel + piece.numel) * per_element + slack + 8 * (len(group) + 1) > budget:
                    self.groups.append((kind, group))
                    group, numel = [], 0
                group.append(piece)
                numel += piece.numel
                self.arena_bytes = max(self.arena_bytes, numel * per_element + slack + 8 * len(group))
            open_groups[key] = (group, numel)
        self.groups.extend((key[0], group) for key, (group, _) in open_groups.items() if group)

    def _cost(self, kind: _Kind, read: int) -> tuple[int, int]:
        """Arena bytes per element of a group, and the alignment slack: the read buffer, the kept bytes of a
        candidate, every state buffer, the scratch and the output."""
        out = DTYPES[kind.out].itemsize
        if kind.accum is None:
            return read + out, 64 * 3
        return 2 * read + DTYPES[kind.accum].itemsize * (self.n_state + _SCRATCH) + out, 64 * (self.n_state + _SCRATCH + 4)

    # --- running ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Every step in order: fetch, each group on the workers, release; then the frozen tensors."""
        torch_threads = None
        if any(kind.accum is not None and not kind.kernel for kind, _ in self.groups):
            import torch

            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".bema-state-", dir=self.state_dir))
        workers = [_Worker(self.arena_bytes, device="cpu", staged=False, identities={}) for _ in range(self.threads)]
        try:
            self.state = {key: self._state_file(folder / f"{key}.state", self.state_bytes) for key in self._state_keys()}
            self.kept_path = folder / "kept.bin"
            os.close(self._state_file(self.kept_path, self.kept_bytes))
            self.kept = self._kept_source()
            self.candidates = {name for name, kind in self.kinds.items() if kind.candidate}
            self.thawed_at: dict[str, int] = {}
            for position, step in enumerate(self.steps):
                source = self.fetch(step)
                if source is not self.plan.sources[step] and source.tensors != self.plan.sources[step].tensors:
                    raise DataError(f"{source.label}: its tensors are not those the plan was made from (did it change since?); rerun")
                with OpenFiles(identities=source.identities) as files:
                    if position > 0 and self.candidates:
                        still = frozen_tensors([self.kept, source], sorted(self.candidates), files)
                        for name in self.candidates - still:
                            self.thawed_at[name] = step
                        self.candidates = still
                for worker in workers:  # files are opened per step (a released step's files may be deleted)
                    worker.files.close()
                    worker.files.identities = source.identities
                self._parallel(workers, lambda worker, group, kind: self._step(worker, group, kind, step, position, source))
                for worker in workers:
                    worker.files.close()
                check_unchanged(source.identities)
                self.release(step)
            self._parallel(workers, lambda worker, group, kind: self._copy_frozen(worker, group, kind))
            self._progress(0, len(self.plan.tensors))
        finally:
            for fd in getattr(self, "state", {}).values():
                os.close(fd)
            for worker in workers:
                worker.files.close()
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # (the output's state folder, when no other run's state is in it)
                self.state_dir.rmdir()
            if torch_threads is not None:
                torch.set_num_threads(torch_threads)

    def _state_keys(self) -> list[str]:
        return [f"theta0-{step}" for step in self.theta0_steps] + [f"slot-{slot}" for slot in range(self.n_slots)]

    @staticmethod
    def _state_file(path: Path, size: int) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)  # sparse until written
        return fd

    def _kept_source(self) -> WeightSource:
        """The candidates' bytes at the first step, as a source (for `frozen_tensors` and the replay on thaw)."""
        first = self.plan.sources[self.steps[0]]
        tensors = {
            name: TensorInfo.contiguous(name, self.kept_path, first.tensors[name].dtype, first.tensors[name].shape, offset)
            for name, offset in self.kept_offset.items()
        }
        return WeightSource(self.steps[0], self.kept_path.parent, tensors)

    def _parallel(self, workers: list[_Worker], work: Callable) -> None:
        """`work(worker, group, kind)` for every group, on every worker; re-raise the first error."""
        next_group = iter(range(len(self.groups)))
        lock = threading.Lock()
        errors: list[BaseException] = []

        def loop(worker: _Worker) -> None:
            try:
                while True:
                    with lock:
                        if errors:
                            return
                        index = next(next_group, None)
                    if index is None:
                        return
                    worker.reset()
                    kind, group = self.groups[index]
                    work(worker, group, kind)
            except BaseException as e:
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=loop, args=(worker,), daemon=True) for worker in workers[1:]]
        for thread in threads:
            thread.start()
        loop(workers[0])
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _progress(self, nbytes: int, ntensors: int) -> None:
        if self._on_progress is not None:
            with self._progress_lock:
                self._on_progress(nbytes, ntensors)

    # --- one group at one step --------------------------------------------------------------------------------

    def _step(self, worker: _Worker, group: list[Slice], kind: _Kind, step: int, position: int, source: WeightSource) -> None:
        if kind.accum is None:
            if step in self.outputs_at:
                self._copy(worker, group, kind, step, source)
            return
        if kind.candidate and position == 0:
            self._keep(worker, group, source)
        averaged = [p for p in group if not kind.candidate or p.name in self.thawed_at]
        thawing = [p for p in averaged if self.thawed_at.get(p.name) == step]
        if thawing:  # every earlier step had the kept bytes: replay them
            for earlier in self.steps[:position]:
                worker.reset()
                self._advance(worker, thawing, kind, earlier, self.kept, count=False)
        if averaged:
            worker.reset()
            self._advance(worker, averaged, kind, step, source)

    def _advance(self, worker: _Worker, pieces: list[Slice], kind: _Kind, step: int, source: WeightSource, *, count: bool = True) -> None:
        """Apply one step's ops to slices: read θ_step (from `source`) and the state, update, write the outputs due
        and the state; `count` the bytes read as progress."""
        layout = _Layout.of(source, pieces)
        numel = sum(p.numel for p in pieces)
        read = worker.take(layout.nbytes)
        self._fill(worker, layout, read)
        if count:
            self._progress(layout.nbytes, 0)
        ops = self.ops.get(step, [])
        outputs = self.outputs_at.get(step, [])
        accum_size = DTYPES[kind.accum].itemsize
        buffers: dict[str, int] = {}  # state key -> arena offset

        def state(key: str, *, load: bool) -> int:
            if key not in buffers:
                buffers[key] = worker.take(numel * accum_size)
                if load:
                    self._state_io(worker, pieces, key, buffers[key], kind, write=False)
            return buffers[key]

        snapshot = step in self.theta0_steps
        touched = list(dict.fromkeys(op.slot for op in ops))
        if kind.kernel:
            x = worker.floats(read, numel, bf16=layout.dtype == "BF16")
            if snapshot:
                kernels.upcast(x, worker.floats(state(f"theta0-{step}", load=False), numel))
            if touched:
                program = kernels.Program([x], slots=len(touched))
                for op in ops:
                    k = touched.index(op.slot)
                    if op.code == "start":
                        program.start(k, worker.floats(state(f"theta0-{int(op.arg)}", load=True), numel))
                        continue
                    if op.code != "scale" and not _started(ops, op):  # an update or a term: from the stored state
                        program.start(k, worker.floats(state(f"slot-{op.slot}", load=True), numel))
                    if op.code == "update":
                        program.update(k, 0, op.arg)
                    elif op.code == "scale":
                        program.scale(k, 0, op.arg)
                    else:
                        program.accumulate(k, 0, op.arg)
                for k, slot in enumerate(touched):
                    program.output(k, 0, None, None, worker.floats(state(f"slot-{slot}", load=False), numel))
                for slot, finite in zip(touched, program.run()):
                    if not finite:
                        self._non_finite(worker, pieces, layout, read, step)
            out_bytes = numel * DTYPES[kind.out].itemsize
            out = worker.take(out_bytes) if outputs else 0
            for output in outputs:
                program = kernels.Program([x], slots=1)
                program.start(0, worker.floats(state(f"slot-{output.slot}", load=True), numel))
                theta0 = worker.floats(state(f"theta0-{output.theta0_step}", load=True), numel) if output.theta0_step is not None else None
                program.output(0, 0, theta0, output.alpha, worker.floats(out, numel, bf16=kind.out == "BF16"))
                if not program.run()[0]:
                    self._non_finite(worker, pieces, layout, read, step)
                self._emit(output.index, pieces, worker.view(out, out_bytes), kind.out)
        else:
            self._advance_on_torch(worker, pieces, kind, step, layout, read, numel, ops, outputs, state)
        for key, offset in buffers.items():
            if key.startswith("slot-") and int(key[5:]) in touched or key == f"theta0-{step}" and snapshot:
                self._state_io(worker, pieces, key, offset, kind, write=True)

    def _advance_on_torch(self, worker, pieces, kind, step, layout, read, numel, ops, outputs, state) -> None:
        """The same ops on torch's ops, as `Engine` runs them where the kernel does not cover the dtypes."""
        import torch

        nbytes = numel * DTYPES[kind.accum].itemsize

        def tensor(offset: int) -> torch.Tensor:
            return worker.tensor(offset, nbytes, kind.accum)

        raw = worker.tensor(read, layout.nbytes, layout.dtype)
        x = raw if raw.dtype == DTYPES[kind.accum].torch else tensor(worker.take(nbytes)).copy_(raw)
        if step in self.theta0_steps:
            tensor(state(f"theta0-{step}", load=False)).copy_(x)
        for op in ops:
            if op.code == "start":
                tensor(state(f"slot-{op.slot}", load=False)).copy_(tensor(state(f"theta0-{int(op.arg)}", load=True)))
            elif op.code == "update":
                tensor(state(f"slot-{op.slot}", load=True)).mul_(1 - op.arg).add_(x, alpha=op.arg)
            elif op.code == "scale":
                torch.mul(x, op.arg, out=tensor(state(f"slot-{op.slot}", load=False)))
            else:
                tensor(state(f"slot-{op.slot}", load=True)).add_(x, alpha=op.arg)
        for slot in dict.fromkeys(op.slot for op in ops):
            if not all_finite(tensor(state(f"slot-{slot}", load=True))):
                self._non_finite(worker, pieces, layout, read, step)
        if not outputs:
            return
        diff, scratch = tensor(worker.take(nbytes)), tensor(worker.take(nbytes))
        out_bytes = numel * DTYPES[kind.out].itemsize
        out_offset = worker.take(out_bytes)
        out = worker.tensor(out_offset, out_bytes, kind.out)
        for output in outputs:
            ema = tensor(state(f"slot-{output.slot}", load=True))
            if output.theta0_step is None:
                value = ema
            else:
                torch.sub(x, tensor(state(f"theta0-{output.theta0_step}", load=True)), out=diff)
                value = torch.mul(diff, output.alpha, out=scratch).add_(ema)
            if not fits(value, kind.out) or not all_finite(out.copy_(value)):
                self._non_finite(worker, pieces, layout, read, step)
            self._emit(output.index, pieces, worker.view(out_offset, out_bytes), kind.out)

    def _copy(self, worker: _Worker, group: list[Slice], kind: _Kind, step: int, source: WeightSource) -> None:
        """Non-float slices, as they are at an output's step."""
        layout = _Layout.of(source, group)
        read = worker.take(layout.nbytes)
        self._fill(worker, layout, read)
        self._progress(layout.nbytes, 0)
        for output in self.outputs_at[step]:
            self._emit(output.index, group, worker.view(read, layout.nbytes), kind.out)

    def _keep(self, worker: _Worker, group: list[Slice], source: WeightSource) -> None:
        """Store the candidates' bytes at the first step."""
        layout = _Layout.of(source, group)
        read = worker.take(layout.nbytes)
        self._fill(worker, layout, read)
        fd = os.open(self.kept_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for piece, offset, dtype in zip(group, layout.offsets, layout.dtypes):
                itemsize = DTYPES[dtype].itemsize
                _pwrite_all(fd, worker.view(read + offset, piece.numel * itemsize), self.kept_offset[piece.name] + piece.start * itemsize)
        finally:
            os.close(fd)

    def _copy_frozen(self, worker: _Worker, group: list[Slice], kind: _Kind) -> None:
        """The tensors still frozen after the last step: their kept bytes, cast to the output dtype if it differs,
        for every output."""
        pieces = [p for p in group if kind.candidate and p.name in self.candidates]
        if not pieces:
            return
        layout = _Layout.of(self.kept, pieces)
        read = worker.take(layout.nbytes)
        self._fill(worker, layout, read)
        data = worker.view(read, layout.nbytes)
        if layout.dtype != kind.out:
            numel = sum(p.numel for p in pieces)
            out_bytes = numel * DTYPES[kind.out].itemsize
            out = worker.take(out_bytes)
            values = worker.tensor(read, layout.nbytes, layout.dtype)
            if not fits(values, kind.out) or not all_finite(worker.tensor(out, out_bytes, kind.out).copy_(values)):
                name = pieces[0].name
                raise DataError(
                    f"tensor {name!r} (frozen: the same in every checkpoint) does not fit in --dtype "
                    f"{DTYPES[kind.out].torch_name}; choose a wider --dtype"
                )
            data = worker.view(out, out_bytes)
        for index in range(len(self.plan.outputs)):
            self._emit(index, pieces, data, kind.out)

    # --- bytes ------------------------------------------------------------------------------------------------

    @staticmethod
    def _fill(worker: _Worker, layout: _Layout, read: int) -> None:
        for path, start, buffer_offset, size in layout.ranges:
            worker.files.read_into(path, start, worker.view(read + buffer_offset, size))

    def _state_io(self, worker: _Worker, pieces: list[Slice], key: str, offset: int, kind: _Kind, *, write: bool) -> None:
        """Read (or write) the slices' part of a state file, back to back at arena `offset`."""
        fd = self.state[key]
        itemsize = DTYPES[kind.accum].itemsize
        for piece in pieces:
            nbytes = piece.numel * itemsize
            view = worker.view(offset, nbytes)
            position = self.state_offset[piece.name] + piece.start * itemsize
            if write:
                _pwrite_all(fd, view, position)
            else:
                done = 0
                while done < nbytes:
                    n = os.preadv(fd, [view[done:]], position + done)
                    if n == 0:
                        raise DataError(f"the state file {key} ended early; was the staging folder changed during the run?")
                    done += n
            offset += nbytes

    def _emit(self, index: int, pieces: list[Slice], data: memoryview, dtype: str) -> None:
        itemsize = DTYPES[dtype].itemsize
        with contextlib.nullcontext() if self._concurrent_sink else self._locks[index]:
            position = 0
            for piece in pieces:
                nbytes = piece.numel * itemsize
                self.sink.write(index, piece, data[position : position + nbytes])
                position += nbytes

    def _non_finite(self, worker: _Worker, pieces: list[Slice], layout: _Layout, read: int, step: int) -> None:
        """Name the tensor, and the step when its input there holds NaN or Inf (earlier inputs may be gone)."""
        import torch

        for piece, offset, dtype in zip(pieces, layout.offsets, layout.dtypes):
            values = worker.tensor(read + offset, piece.numel * DTYPES[dtype].itemsize, dtype)
            if not bool(torch.isfinite(values.float()).all()):
                at = "in the base model" if step == 0 else f"at step {step}"
                raise DataError(
                    f"tensor {piece.name!r} has NaN or Inf values {at}; the run diverged there: narrow the steps with --max-step, or drop that checkpoint"
                )
        names = ", ".join(dict.fromkeys(p.name for p in pieces))
        raise DataError(
            f"averaging overflowed to Inf or NaN by step {step} in {names}; an earlier checkpoint may hold NaN or Inf, "
            "or try --accum-dtype float64 or another --dtype"
        )


def _started(ops: list[_Op], op: _Op) -> bool:
    """Whether an earlier op of the same step already put `op`'s slot into the program."""
    for earlier in ops:
        if earlier is op:
            return False
        if earlier.slot == op.slot:
            return True
    return False


def _pwrite_all(fd: int, view: memoryview, position: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], position + done)
