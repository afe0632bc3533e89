"""The LoRA engine: the merged average of a LoRA run, streamed tensor by tensor within `--max-memory`.

A LoRA checkpoint holds factors, not weights: θᵢ = W0 + s·Bᵢ·Aᵢ. Every output of a plan (a replayed BEMA or EMA
too: its effective weights) is therefore W0 + s·Σ wᵢ·Bᵢ·Aᵢ, which `engine/lora.py` computes one targeted module and
one block of rows at a time. This module runs those calls over a whole plan, as `Engine` does for full weights, and
hands every output slice to the same `Sink`:

- each output tensor is one task, taken by one of `threads` workers in the plan's order (the order of the shards,
  so that they complete one after the other);
- a LoRA-targeted weight: the worker reads every checkpoint's factors for the module (r·(in + out) values each),
  builds each output's stacked factors once, then reads W0 in blocks of rows (whole tiles of `TILE_ROWS`) and
  writes each output's rows, cast to the output dtype. The base is read once, whatever the number of outputs;
- a bias changed by `lora_bias`: whole (it is one row);
- a tensor trained in full (`modules_to_save`, trained biases): blocks of rows of the base and of every
  checkpoint's copy, summed with the output's weights;
- any other tensor is W0: copied byte for byte, or cast to `--dtype`.

Memory: a task holds its factors and stacked products (`fixed`) and, per row of a block, the rows of W0, of the
product and of the cast output (`per_row`). Blocks are sized so that a worker's task stays within its share of
`--max-memory` (and within `BLOCK_BYTES` when more is allowed: larger blocks gain nothing); fewer workers run when
the largest task needs more than a share, and a budget too small for one tile of it is refused in one line. The
products are computed in fixed tiles of `TILE_ROWS` rows, so the bits depend neither on the blocks nor on the
workers: not on `--max-memory`, not on `--threads`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..dtypes import DTYPES, FLOAT_DTYPES
from ..errors import DataError, UsageError
from ..files import OpenFiles, writable_view
from ..sources.peft import LoraModule, ModuleFactors, read_module_factors, read_tensor
from ..sources.tensors import BASE_STEP, TensorInfo
from .engine import Sink, Slice, all_finite, check_device, default_threads, fits
from .workqueue import WorkQueue
from .lora import TILE_ROWS, ModuleAverage, full_rows, tiles_numel
from .plan import Plan

BLOCK_BYTES = 16 * 2**20  # a block's working memory per worker when --max-memory allows more
_ALIGN = 64


@dataclass(frozen=True)
class _Task:
    """One output tensor: what it is (`kind`: "module", "bias", "full" or "copy"), its W0 in the base, and its
    working memory: `fixed` bytes for the whole task, `per_row` bytes per row of a block (`whole`: one block)."""

    name: str
    kind: str
    theta0: TensorInfo
    fixed: int
    per_row: int
    whole: bool = False

    @property
    def rows(self) -> int:
        return self.theta0.shape[0] if self.theta0.shape else 1

    @property
    def minimum(self) -> int:
        """The least memory the task runs in: one tile of rows (or the whole tensor)."""
        return self.fixed + self.per_row * (self.rows if self.whole else min(self.rows, TILE_ROWS))

    def block_rows(self, budget: int) -> int:
        """Rows per block within `budget` bytes: whole tiles, at least one (or the whole tensor)."""
        if self.whole:
            return self.rows
        rows = (budget - self.fixed) // max(self.per_row, 1) // TILE_ROWS * TILE_ROWS
        return max(TILE_ROWS, min(rows, BLOCK_BYTES // max(self.per_row, 1) // TILE_ROWS * TILE_ROWS))


class _Arena:
    """A worker's working memory for one block at a time: one buffer, grown to the largest block's need (within the
    worker's share of `--max-memory`) and reused, from which each block takes its rows of W0, its product and its
    cast rows (each once, then the same bytes again for the next output). Its pages stay allocated, and counted, once,
    rather than freed to the allocator's per-thread pools."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._taken: dict[str, tuple[int, int]] = {}  # purpose -> (start, stop) in the buffer
        self._used = 0

    def start_block(self, nbytes: int) -> None:
        """Make room for a block that takes at most `nbytes` (alignment included); frees what the last one took."""
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # (freed before the larger one is allocated)
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        self._taken.clear()
        self._used = 0

    def take(self, purpose: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of `dtype` for `purpose`, 64-byte aligned: the same bytes for the same purpose within a
        block (their values are whatever was left there)."""
        nbytes = numel * dtype.itemsize
        if purpose not in self._taken:
            start = -(-self._used // _ALIGN) * _ALIGN
            self._taken[purpose] = (start, start + nbytes)
            self._used = start + nbytes
        start, stop = self._taken[purpose]
        if stop > self._buffer.numel() or start + nbytes > stop:
            raise RuntimeError(f"a block took more of its worker's arena than it announced ({purpose}); report this bug")
        return self._buffer[start : start + nbytes].view(dtype)


class LoraEngine:
    """Computes a LoRA plan's merged outputs and sends every output slice to a `Sink` (the interface of `Engine`).

    Args:
        plan (`Plan`): a plan with `plan.lora` (a LoRA run).
        sink (`Sink`): receives output slices.
        accum_dtype (`str`, defaults to "float32"): "float32" or "float64".
        max_memory (`int`): working-memory budget in bytes, shared by all workers.
        threads (`int`, *optional*): workers; default one per core (see `default_threads`).
        device (`str`, defaults to "cpu"): only "cpu": the products run on the CPU.
        on_progress (`Callable[[int, int], None]`, optional): called with (bytes read, tensors finished).
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
    ) -> None:
        if plan.lora is None:
            raise ValueError("LoraEngine runs the plans of LoRA runs only")
        if check_device(device) != "cpu":
            raise UsageError(f"--device {device}: the products of a LoRA run are computed on the CPU; leave out --device")
        self.plan = plan
        self.lora = plan.lora
        self.sink = sink
        self.dtype = DTYPES[FLOAT_DTYPES[accum_dtype]].torch
        self.layout = plan.lora.run.layout
        self.tasks = [self._task(info.name) for info in plan.tensors]
        largest = max(self.tasks, key=lambda task: task.minimum, default=None)
        if largest is not None and largest.minimum > max_memory:
            what = "the whole tensor" if largest.whole else "one tile of rows"
            if largest.fixed:
                what = f"its factors for {len(plan.outputs)} output{'s' if len(plan.outputs) > 1 else ''} and {what}"
            raise UsageError(
                f"--max-memory {max_memory} bytes is too small for tensor {largest.name!r} ({what}); "
                f"give at least {_mib(largest.minimum)} MiB"
            )
        threads = threads or default_threads()
        self.threads = max(1, min(threads, len(self.tasks), max_memory // max(largest.minimum if largest else 1, 1)))
        self.budget = max_memory // self.threads
        self._output_locks = [threading.Lock() for _ in plan.outputs]
        self._concurrent_sink = getattr(sink, "concurrent", False)
        self.queue = WorkQueue(len(self.tasks), on_progress)

    # --- planning ------------------------------------------------------------------------------------------------

    def _task(self, name: str) -> _Task:
        layout, lora = self.layout, self.lora
        theta0 = lora.base.tensors[lora.theta0_names[name]]
        acc = self.dtype.itemsize
        out_dtype = self.plan.output_dtypes[name]
        out = DTYPES[out_dtype].itemsize
        cols = math.prod(theta0.shape[1:]) if theta0.shape else 1
        read_row = cols * theta0.itemsize
        outputs, checkpoints = len(self.plan.outputs), len(lora.steps)
        if name in layout.modules:
            module = layout.modules[name]
            rows = module.shape[0]
            stacked = module.rank * (checkpoints if lora.average == "exact" else 1) * sum(module.shape)
            # every checkpoint's factors, each output's stacked factors, and a float64 block of one while it is built
            fixed = checkpoints * module.rank * sum(module.shape) * acc + outputs * stacked * acc + 3 * module.rank * rows * 8
            # W0's row, the product's row (and the padding of a last, partial tile), the cast row
            per_row = read_row + 2 * cols * acc + cols * out
            if module.magnitude is not None:  # DoRA keeps s·B in float64 and its row norms; three more rows per row
                fixed += outputs * checkpoints * (module.rank * rows * 8 + 16 * rows)
                per_row += 3 * cols * acc + 16 * module.rank * checkpoints
            return _Task(name, "module", theta0, fixed, per_row, whole=not module.rows_independent)
        if name in layout.lora_biases:
            module = layout.lora_biases[name]
            fixed = checkpoints * module.rank * sum(module.shape) * acc + outputs * 3 * theta0.numel * 8
            return _Task(name, "bias", theta0, fixed, read_row, whole=True)
        if name in layout.full_tensors:
            key = layout.full_tensors[name].key
            copy_row = sum(cols * DTYPES[lora.run.checkpoints[step].shapes[key][0]].itemsize for step in lora.steps)
            return _Task(name, "full", theta0, 0, read_row + copy_row + 2 * cols * acc + cols * out)
        cast = out_dtype != theta0.dtype
        return _Task(name, "copy", theta0, 0, read_row + (cols * (4 + out) if cast else 0))

    # --- running -------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Compute every task on `threads` workers; re-raise the first error any worker met."""
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # workers, not intra-op threads (and a fixed summation order in every product)
        threads = [threading.Thread(target=self._work, name=f"bema-lora-{i}", daemon=True) for i in range(1, self.threads)]
        try:
            for thread in threads:
                thread.start()
            self._work()
        except BaseException as e:  # Ctrl-C in the main thread: stop the others too
            self.queue.fail(e)
        finally:
            for thread in threads:
                thread.join()
            torch.set_num_threads(torch_threads)
        self.queue.raise_error()

    def _work(self) -> None:
        arena = _Arena()
        try:
            with OpenFiles(identities=self.plan.identities) as files:
                while (index := self.queue.take()) is not None:
                    task = self.tasks[index]
                    getattr(self, f"_{task.kind}")(task, files, arena)
                    self.queue.progress(self.lora.read_bytes(task.name), 1)
        except BaseException as e:
            self.queue.fail(e)

    # --- one task ------------------------------------------------------------------------------------------------

    def _factors(self, module: LoraModule, files: OpenFiles) -> dict[int, ModuleFactors]:
        factors = {}
        for step in self.lora.steps:
            checkpoint = self.lora.run.checkpoints[step]
            factors[step] = read_module_factors(module, checkpoint, files, self.dtype)
            for key, value in zip(module.factor_keys, (factors[step].A, factors[step].B, factors[step].magnitude, factors[step].lora_bias)):
                if value is not None and not all_finite(value):
                    raise DataError(
                        f"{checkpoint.weights_file}: {key!r} has NaN or Inf values at step {step}; the run diverged there: "
                        "narrow the steps with --max-step, or drop that checkpoint"
                    )
        return factors

    def _averages(self, module: LoraModule, files: OpenFiles) -> list[ModuleAverage]:
        """Each output's average of the module, from every checkpoint's factors read once."""
        factors = self._factors(module, files)
        return [ModuleAverage(module, factors, out.weights, mode=self.lora.average, dtype=self.dtype) for out in self.plan.outputs]

    def _module(self, task: _Task, files: OpenFiles, arena: _Arena) -> None:
        averages = self._averages(self.layout.modules[task.name], files)
        block = task.block_rows(self.budget)
        for start in range(0, task.rows, block):
            w0 = self._read(task, files, arena, start, min(start + block, task.rows), product=True)
            out = arena.take("product", tiles_numel(w0.shape[0], w0.shape[1]), self.dtype)
            for index, average in enumerate(averages):
                self._emit(index, task, start, self._checked(task, average.rows(w0, start, out), w0, arena=arena))

    def _bias(self, task: _Task, files: OpenFiles, arena: _Arena) -> None:
        averages = self._averages(self.layout.lora_biases[task.name], files)
        b0 = read_tensor(task.theta0, files)
        for index, average in enumerate(averages):
            self._emit(index, task, 0, self._checked(task, average.bias(b0), b0))

    def _full(self, task: _Task, files: OpenFiles, arena: _Arena) -> None:
        key = self.layout.full_tensors[task.name].key
        block = task.block_rows(self.budget)
        for start in range(0, task.rows, block):
            stop = min(start + block, task.rows)
            w0 = self._read(task, files, arena, start, stop)
            copies = {step: self.lora.run.checkpoints[step].read_tensor(key, files, rows=(start, stop)) for step in self.lora.steps}
            for index, out in enumerate(self.plan.outputs):
                used = {step: copies[step] for step in out.weights if step != BASE_STEP}
                average = full_rows(w0, used, out.weights, dtype=self.dtype)
                self._emit(index, task, start, self._checked(task, average, w0, used, arena=arena))

    def _copy(self, task: _Task, files: OpenFiles, arena: _Arena) -> None:
        """W0 as it is, in blocks: its bytes themselves when the output dtype is the base's, else cast."""
        cast = self.plan.output_dtypes[task.name] != task.theta0.dtype
        block = task.block_rows(self.budget)
        for start in range(0, task.rows, block):
            w0 = self._read(task, files, arena, start, min(start + block, task.rows))
            value = self._checked(task, w0, w0, arena=arena) if cast else w0
            for index in range(len(self.plan.outputs)):
                self._emit(index, task, start, value)

    def _read(self, task: _Task, files: OpenFiles, arena: _Arena, start: int, stop: int, *, product: bool = False) -> torch.Tensor:
        """Start a block: room in the arena for its rows of W0, of the product (`product`) and of the output when it
        is cast; then rows [start, stop) of the task's W0, read into it."""
        cols = math.prod(task.theta0.shape[1:]) if task.theta0.shape else 1
        rows = stop - start
        out = DTYPES[self.plan.output_dtypes[task.name]]
        computed = task.theta0.torch_dtype if task.kind == "copy" else self.dtype  # what is cast to the output dtype
        need = rows * cols * (task.theta0.itemsize + (out.itemsize if out.torch != computed else 0)) + 3 * _ALIGN
        if product:
            need += tiles_numel(rows, cols) * self.dtype.itemsize
        arena.start_block(need)
        return read_tensor(task.theta0, files, start, stop, into=arena.take("w0", rows * cols * task.theta0.itemsize, torch.uint8))

    # --- output --------------------------------------------------------------------------------------------------

    def _checked(
        self, task: _Task, value: torch.Tensor, w0: torch.Tensor, copies: Mapping[int, torch.Tensor] | None = None, *, arena: _Arena | None = None
    ) -> torch.Tensor:
        """`value` cast to the output dtype (in the block's arena, when given), every element finite and within the
        dtype's range (else the cause is named: W0, a checkpoint's copy, or the arithmetic)."""
        dtype = self.plan.output_dtypes[task.name]
        target = DTYPES[dtype].torch
        if fits(value, dtype):
            if value.dtype == target or arena is None:
                cast = value.to(target)
            else:
                cast = arena.take("cast", value.numel(), target).view(value.shape).copy_(value)
            if all_finite(cast):
                return cast
        if not all_finite(w0):
            raise DataError(
                f"tensor {task.theta0.name!r} has NaN or Inf values in the base model ({task.theta0.path}); "
                "pass the base model this adapter was trained on (--base-model)"
            )
        for step, copy in (copies or {}).items():
            if not all_finite(copy):
                checkpoint = self.lora.run.checkpoints[step]
                raise DataError(
                    f"{checkpoint.weights_file}: {self.layout.full_tensors[task.name].key!r} has NaN or Inf values at step {step}; "
                    "the run diverged there: narrow the steps with --max-step, or drop that checkpoint"
                )
        out = DTYPES[dtype]
        if out.saturates_beyond is not None:
            raise DataError(
                f"tensor {task.name!r}: its average has values beyond ±{out.saturates_beyond:g}, which {out.name} cannot "
                "hold (torch would clamp them silently); choose a wider --dtype"
            )
        raise DataError(f"averaging tensor {task.name!r} overflowed to Inf or NaN; try --accum-dtype float64 or another --dtype")

    def _emit(self, index: int, task: _Task, start_row: int, value: torch.Tensor) -> None:
        """Hand rows from `start_row` on (in the output dtype) to the sink: one worker per output at a time, unless
        the sink is concurrent."""
        value = value.contiguous()
        per_row = math.prod(task.theta0.shape[1:]) if task.theta0.shape else 1
        piece = Slice(task.name, start_row * per_row, start_row * per_row + value.numel())
        with contextlib.nullcontext() if self._concurrent_sink else self._output_locks[index]:
            self.sink.write(index, piece, writable_view(value))


def _mib(nbytes: int) -> int:
    return -(-nbytes // 2**20)
