"""The streaming engine: replay the BEMA/EMA recurrences group by group, reading each input byte once.

For each group of tensor slices that fits the memory budget, and for each step in order, the engine reads those
slices from that step's files with `pread`, advances every schedule's recurrence, and hands each output slice to
a sink as soon as it is known. State is θ0 (one per distinct `update_after`) and one EMA per schedule, only for
the group in hand.

The arithmetic is TRL's, op for op, on each tensor slice:

    ema.mul_(1 - beta).add_(theta_t, alpha=beta)
    bema = ema + alpha * (theta_t - theta0)

Elementwise ops give the same bits on any slicing, so the result does not depend on the budget.
A tensor that is bit-identical in θ0 and in every checkpoint replayed (a frozen parameter) is written unchanged.
Non-float tensors are copied from the output step's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .checkpoints import BASE_STEP
from .errors import DataError
from .plan import Plan
from .safetensors_io import DTYPES, OpenFiles, all_finite, writable_view

# Per-element transient memory while one slice is processed: the upcast input, θ_t − θ0, and the result.
_TRANSIENT_ACCUM_COPIES = 3
MIN_MEMORY = 4096


@dataclass(frozen=True)
class Slice:
    """Elements [start, stop) of one tensor, flattened."""

    name: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


class Sink:
    """Where output slices go. `write(output_index, slice, tensor)`; the tensor is in the accumulation dtype
    (or the input dtype for non-float tensors), and is only valid during the call."""

    def write(self, output_index: int, piece: Slice, tensor: torch.Tensor) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass(frozen=True)
class _Update:
    schedule_index: int
    beta: float


def accumulation_dtype(input_dtype: torch.dtype, accum_dtype: torch.dtype) -> torch.dtype:
    """The wider of the requested accumulation dtype and the input's (fp64 checkpoints stay fp64)."""
    return torch.promote_types(input_dtype, accum_dtype)


def group_slices(plan: Plan, *, max_memory: int, accum_dtype: torch.dtype) -> list[list[Slice]]:
    """Cut the tensors into slices and pack them into groups whose working memory fits `max_memory` bytes."""
    if max_memory < MIN_MEMORY:
        raise DataError(f"--max-memory {max_memory} bytes is too small; give at least {MIN_MEMORY} bytes")
    n_theta0 = len({run.schedule.theta0_step for run in plan.schedules})
    n_ema = len(plan.schedules)
    groups: list[list[Slice]] = []
    group: list[Slice] = []
    group_bytes = group_transient = 0
    for info in plan.tensors:
        read_size = max(source.tensors[info.name].itemsize for source in plan.sources.values())
        if info.is_float:
            accum_size = accumulation_dtype(info.torch_dtype, accum_dtype).itemsize
            resident = read_size + accum_size * (n_theta0 + n_ema)
            transient = accum_size * _TRANSIENT_ACCUM_COPIES + 8
        else:
            resident, transient = read_size, 0
        per_slice = max(1, max_memory // (2 * (resident + transient)))
        for start in range(0, max(info.numel, 1), per_slice):
            piece = Slice(info.name, start, min(start + per_slice, info.numel))
            piece_bytes, piece_transient = resident * piece.numel, transient * piece.numel
            if group and group_bytes + piece_bytes + max(group_transient, piece_transient) > max_memory:
                groups.append(group)
                group, group_bytes, group_transient = [], 0, 0
            group.append(piece)
            group_bytes += piece_bytes
            group_transient = max(group_transient, piece_transient)
    if group:
        groups.append(group)
    return groups


class Engine:
    """Replays a `Plan` and sends every output slice to a `Sink`.

    Args:
        plan (`Plan`): what to read and write.
        sink (`Sink`): receives output slices.
        accum_dtype (`torch.dtype`, defaults to float32): accumulation dtype (widened to the input's if wider).
        max_memory (`int`): working-memory budget in bytes for tensor data.
        on_progress (`Callable[[int, int], None]`, optional): called with (bytes read, tensors finished).
    """

    def __init__(
        self,
        plan: Plan,
        sink: Sink,
        *,
        accum_dtype: torch.dtype = torch.float32,
        max_memory: int,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.plan = plan
        self.sink = sink
        self.accum_dtype = accum_dtype
        self.groups = group_slices(plan, max_memory=max_memory, accum_dtype=accum_dtype)
        self.on_progress = on_progress or (lambda nbytes, ntensors: None)
        self.files = OpenFiles()
        self.theta0_steps = sorted({run.schedule.theta0_step for run in plan.schedules})
        self.updates: dict[int, list[_Update]] = {}
        for index, run in enumerate(plan.schedules):
            for step in run.update_steps:
                self.updates.setdefault(step, []).append(_Update(index, run.schedule.beta(step)))
        self.outputs_at: dict[tuple[int, int], list[tuple[int, str, float]]] = {}
        for index, out in enumerate(plan.outputs):
            alpha = plan.schedules[out.schedule_index].schedule.alpha(out.step)
            self.outputs_at.setdefault((out.schedule_index, out.step), []).append((index, out.kind, alpha))
        self.output_steps = {step for _, step in self.outputs_at}
        self.output_dtypes = {name: DTYPES[dtype] for name, dtype in plan.output_dtypes.items()}
        self.last_slice = {}
        for group in self.groups:
            for piece in group:
                self.last_slice[piece.name] = piece

    def run(self) -> None:
        try:
            for group in self.groups:
                self._run_group(group)
        finally:
            self.files.close()

    # --- one group -------------------------------------------------------------------------------------------

    def _run_group(self, group: list[Slice]) -> None:
        theta0: dict[tuple[int, Slice], torch.Tensor] = {}
        ema: dict[tuple[int, Slice], torch.Tensor] = {}
        unchanged: dict[tuple[int, Slice], bool] = {}
        buffer = torch.empty(self._read_bytes(group), dtype=torch.uint8)
        for step in self.plan.read_steps:
            for piece, x in zip(group, self._read(step, group, buffer)):
                if not x.dtype.is_floating_point:
                    if step in self.output_steps:
                        self._emit_raw(step, piece, x)
                    continue
                xa = x.to(accumulation_dtype(self._input_dtype(piece), self.accum_dtype))
                fresh = xa.data_ptr() != x.data_ptr()  # .to() made a copy we may keep
                if step in self.theta0_steps:
                    theta0[step, piece] = xa if fresh else xa.clone()
                for index, run in enumerate(self.plan.schedules):
                    tau = run.schedule.theta0_step
                    if step == tau:
                        ema[index, piece] = theta0[tau, piece].clone()
                        unchanged[index, piece] = True
                for update in self.updates.get(step, ()):
                    key = (update.schedule_index, piece)
                    ema[key].mul_(1 - update.beta).add_(xa, alpha=update.beta)
                    tau = self.plan.schedules[update.schedule_index].schedule.theta0_step
                    if unchanged[key]:
                        unchanged[key] = torch.equal(xa, theta0[tau, piece])
                    for output_index, kind, alpha in self.outputs_at.get((update.schedule_index, step), ()):
                        if unchanged[key]:
                            out = theta0[tau, piece]
                        elif kind == "ema":
                            out = ema[key]
                        else:
                            out = ema[key] + alpha * (xa - theta0[tau, piece])
                        self._emit(output_index, piece, out)
        for (_, piece), state in ema.items():
            if not all_finite(state):
                self.raise_non_finite(piece)
        self.on_progress(0, sum(1 for piece in group if self.last_slice[piece.name] == piece))

    def _emit(self, output_index: int, piece: Slice, tensor: torch.Tensor) -> None:
        """Cast to the output dtype, refuse non-finite values, and hand the slice to the sink."""
        out = tensor.to(self.output_dtypes[piece.name])
        if out.dtype.is_floating_point and not all_finite(out):
            self.raise_non_finite(piece)
        self.sink.write(output_index, piece, out)

    def _emit_raw(self, step: int, piece: Slice, x: torch.Tensor) -> None:
        for (index, output_step), outs in self.outputs_at.items():
            if output_step == step:
                for output_index, _, _ in outs:
                    self._emit(output_index, piece, x)

    # --- reading ---------------------------------------------------------------------------------------------

    def _input_dtype(self, piece: Slice) -> torch.dtype:
        return DTYPES[self.plan.sources[self.plan.read_steps[-1]].tensors[piece.name].dtype]

    def _read_bytes(self, group: list[Slice]) -> int:
        return max(
            sum(source.tensors[p.name].itemsize * p.numel for p in group) for source in self.plan.sources.values()
        )

    def _read(self, step: int, group: list[Slice], buffer: torch.Tensor) -> Iterator[torch.Tensor]:
        """Read the group's slices at `step` into `buffer`, coalescing adjacent ranges; yield typed views."""
        source = self.plan.sources[step]
        ranges = []  # (path, file offset, buffer offset, nbytes)
        offset = 0
        for piece in group:
            info = source.tensors[piece.name]
            start, nbytes = info.start + piece.start * info.itemsize, piece.numel * info.itemsize
            last = ranges[-1] if ranges else None
            if last and last[0] == info.path and last[1] + last[3] == start and last[2] + last[3] == offset:
                ranges[-1] = (last[0], last[1], last[2], last[3] + nbytes)
            else:
                ranges.append((info.path, start, offset, nbytes))
            offset += nbytes
        view = writable_view(buffer)
        for path, start, buffer_offset, nbytes in ranges:
            self.files.read_into(path, start, view[buffer_offset : buffer_offset + nbytes])
        self.on_progress(offset, 0)
        offset = 0
        for piece in group:
            info = source.tensors[piece.name]
            nbytes = piece.numel * info.itemsize
            yield buffer[offset : offset + nbytes].view(info.torch_dtype)
            offset += nbytes

    # --- errors ----------------------------------------------------------------------------------------------

    def raise_non_finite(self, piece: Slice) -> None:
        """Name the first step whose input holds NaN or Inf in this tensor, or report an overflow."""
        for step in self.plan.read_steps:
            info = self.plan.sources[step].tensors[piece.name]
            buffer = torch.empty(piece.numel * info.itemsize, dtype=torch.uint8)
            self.files.read_into(info.path, info.start + piece.start * info.itemsize, writable_view(buffer))
            if info.is_float and not all_finite(buffer.view(info.torch_dtype)):
                at = "in the base model" if step == BASE_STEP else f"at step {step}"
                raise DataError(
                    f"tensor {piece.name!r} has NaN or Inf values {at} ({info.path}); "
                    "the run diverged there: narrow the steps with --max-step, or drop that checkpoint"
                )
        raise DataError(
            f"averaging tensor {piece.name!r} overflowed to Inf or NaN; try --accum-dtype float64 or another --dtype"
        )
