"""The interface every reader gives the rest of the package: tensors by name, dtype and shape, and where each
element's bytes lie.

A reader knows bytes and names, never schedules. What it hands over is a `WeightSource` per step: its tensors, each
a `TensorInfo` whose `extents` say in which file, at which byte offset, each run of its elements (flattened, in
row-major order) is stored. A safetensors tensor is one extent; a tensor saved in shards (FSDP's distributed
checkpoint, DeepSpeed's partitions) is several, possibly in several files. The engine reads any slice of elements
with `TensorInfo.ranges` and positioned reads, whatever the layout.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import DTYPES
from ..files import FileIdentity

if TYPE_CHECKING:
    import torch

BASE_STEP = 0  # the weights before training (the base model); `checkpoint-N` is step N


@dataclass(frozen=True, slots=True)
class Extent:
    """Elements [first, stop) of a tensor, stored back to back from byte `offset` of `path`."""

    path: Path
    offset: int
    first: int
    stop: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a source: its name, safetensors dtype name, shape, and the extents holding its elements (in
    order, covering every element once)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    extents: tuple[Extent, ...]

    @classmethod
    def contiguous(cls, name: str, path: Path, dtype: str, shape: tuple[int, ...], start: int) -> TensorInfo:
        """A tensor stored in one piece from byte `start` of `path` (safetensors, a `.bin` storage)."""
        return cls(name, dtype, tuple(shape), (Extent(path, start, 0, math.prod(shape)),))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].is_float

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype].torch

    @property
    def path(self) -> Path:
        """The file holding the tensor's first elements (the one to name in messages)."""
        return self.extents[0].path

    @property
    def start(self) -> int:
        """The byte offset of the first element in `path`."""
        return self.extents[0].offset

    @property
    def paths(self) -> set[Path]:
        return {extent.path for extent in self.extents}

    def ranges(self, first: int, stop: int) -> list[tuple[Path, int, int]]:
        """The file ranges `(path, byte offset, nbytes)` holding elements [first, stop), in element order."""
        itemsize = self.itemsize
        if len(self.extents) == 1:  # nearly every tensor: one piece
            extent = self.extents[0]
            return [(extent.path, extent.offset + (first - extent.first) * itemsize, (stop - first) * itemsize)] if first < stop else []
        ranges = []
        index = max(0, bisect.bisect_right([extent.first for extent in self.extents], first) - 1)
        while first < stop:
            extent = self.extents[index]
            end = min(stop, extent.stop)
            ranges.append((extent.path, extent.offset + (first - extent.first) * itemsize, (end - first) * itemsize))
            first = end
            index += 1
        return ranges


@dataclass(frozen=True)
class WeightSource:
    """The weights at one step: a checkpoint folder, or the base model (step 0).

    Args:
        step (`int`): the step (0: the base model).
        folder (`Path`): the folder read.
        tensors (`dict[str, TensorInfo]`): the tensors by name, in storage order.
        identities (`dict[Path, FileIdentity]`): every file the tensors lie in, as it was when its header was read.
        layout (`str`): what was read, e.g. "safetensors" or "pytorch .bin".
        notes (`tuple[str, ...]`): what a user should know about these weights (recorded in the provenance).
    """

    step: int
    folder: Path
    tensors: dict[str, TensorInfo]
    identities: dict[Path, FileIdentity] = field(default_factory=dict)
    layout: str = "safetensors"
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"base model {self.folder}" if self.step == BASE_STEP else f"step {self.step} ({self.folder})"

    @property
    def files(self) -> list[Path]:
        return sorted(self.identities)
