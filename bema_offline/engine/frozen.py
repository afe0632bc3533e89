"""Which tensors are frozen: bit-identical in every source a run reads, decided per whole tensor.

TRL's `BEMACallback` averages trainable parameters only; a frozen one stays as it was. The checkpoints do not say
which parameters were trainable, but a frozen one is the same in every checkpoint, to the bit. Replaying the
recurrence on it would not give it back exactly (`(1 − β)·x + β·x` rounds), so a frozen tensor is copied instead.

The decision is made per whole tensor, by comparing bytes (so −0.0 and +0.0 differ, and every NaN payload counts),
before anything is computed. It therefore depends on nothing but the inputs: not on `--max-memory`, `--threads`,
`--resume` or the number of ranks. A tensor that changed in a single element anywhere is averaged in full, as TRL
averages it; the embedding rows of tokens that never occur in the data, which never change, are averaged with the
rest of their tensor.

Comparisons stop at the first difference and start small (a trainable tensor usually differs in its first bytes),
so the check reads a few KiB per trained tensor; only frozen tensors are read through, once per source. Small tensors
(an MoE's thousands of experts) are compared whole, many per read.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..files import OpenFiles
from ..sources.tensors import TensorInfo, WeightSource

FIRST_CHUNK = 4096  # bytes compared first; each further chunk is 4 times larger, up to LARGEST_CHUNK
LARGEST_CHUNK = 4 * 2**20


def frozen_tensors(sources: Iterable[WeightSource], names: Iterable[str], files: OpenFiles, *, max_memory: int | None = None) -> set[str]:
    """The float tensors among `names` whose bytes (and dtype) are the same in every source.

    Args:
        sources (`Iterable[WeightSource]`): every source the run reads (θ0 and the update steps).
        names (`Iterable[str]`): the tensors to decide for.
        files (`OpenFiles`): where to read (its identity checks apply).
        max_memory (`int`, *optional*): the working memory the reads may take (whatever the number of sources:
            each is compared with the first in turn); default 16 MiB.
    """
    sources = list(sources)
    if len(sources) < 2:
        return set()
    chunk = LARGEST_CHUNK if max_memory is None else max(FIRST_CHUNK, min(LARGEST_CHUNK, max_memory // 4))
    frozen = set()
    small: list[list[TensorInfo]] = []  # small tensors are compared whole, many per read (an MoE has thousands)
    small_bytes = 0
    for name in names:
        infos = [source.tensors[name] for source in sources]
        if not infos[0].is_float or len({info.dtype for info in infos}) > 1:
            continue
        nbytes = infos[0].nbytes
        if nbytes <= SMALL_TENSOR and all(len(info.extents) == 1 for info in infos):
            small.append(infos)
            small_bytes += nbytes
            if small_bytes >= chunk:
                frozen |= _same_small(small, files)
                small, small_bytes = [], 0
        elif _same_bytes(infos, files, largest=chunk):
            frozen.add(name)
    return frozen | _same_small(small, files)


SMALL_TENSOR = FIRST_CHUNK  # bytes: a tensor no larger than the first comparison is read whole, beside its neighbours


def _same_small(batch: list[list[TensorInfo]], files: OpenFiles) -> set[str]:
    """The tensors of `batch` (each a list of one small tensor's infos, one per source) that are the same in every
    source; each source's part is read in spans of neighbouring tensors, not tensor by tensor, and compared with
    the first source's (two sources in memory at once, whatever their number)."""
    if not batch:
        return set()
    reference = _read_many([infos[0] for infos in batch], files)
    same = [True] * len(batch)
    for k in range(1, len(batch[0])):
        content = _read_many([infos[k] for infos in batch], files)
        same = [alike and content[i] == reference[i] for i, alike in enumerate(same)]
        del content  # (before the next source's span is read)
        if not any(same):
            break
    return {infos[0].name for infos, alike in zip(batch, same) if alike}


def _read_many(infos: list[TensorInfo], files: OpenFiles) -> list[memoryview]:
    """The bytes of several one-piece tensors, reading each file's span of them at once when they lie close."""
    places = [(info.path, info.start, info.nbytes) for info in infos]
    by_file: dict[object, list[int]] = {}
    for i, (path, _, _) in enumerate(places):
        by_file.setdefault(path, []).append(i)
    found: list[memoryview] = [memoryview(b"")] * len(infos)
    for path, indexes in by_file.items():
        first = min(places[i][1] for i in indexes)
        end = max(places[i][1] + places[i][2] for i in indexes)
        if end - first > 2 * sum(places[i][2] for i in indexes):  # scattered: tensor by tensor
            for i in indexes:
                found[i] = memoryview(_read(infos[i], 0, infos[i].numel, files))
            continue
        span = memoryview(bytearray(end - first))
        files.read_into(path, first, span)
        for i in indexes:
            offset = places[i][1] - first
            found[i] = span[offset : offset + places[i][2]]
    return found


def _same_bytes(infos: list[TensorInfo], files: OpenFiles, *, largest: int = LARGEST_CHUNK) -> bool:
    reference, others = infos[0], infos[1:]
    itemsize = reference.itemsize
    first, chunk = 0, max(1, FIRST_CHUNK // itemsize)
    while first < reference.numel:
        stop = min(reference.numel, first + chunk)
        expected = _read(reference, first, stop, files)
        if any(_read(info, first, stop, files) != expected for info in others):
            return False
        first, chunk = stop, min(chunk * 4, max(1, largest // itemsize))
    return True


def _read(info: TensorInfo, first: int, stop: int, files: OpenFiles) -> bytes:
    data = bytearray((stop - first) * info.itemsize)
    view, done = memoryview(data), 0
    for path, offset, nbytes in info.ranges(first, stop):
        files.read_into(path, offset, view[done : done + nbytes])
        done += nbytes
    return bytes(data)
