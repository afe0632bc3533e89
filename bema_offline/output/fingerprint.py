"""Fingerprints of model weights: one sha256 over every tensor's name, dtype, shape and bytes, in name order.

The same weights give the same fingerprint whether they are read from a folder's safetensors files or taken from
a model in memory, so a loaded model can be checked, bit for bit, against the folder it should hold. (Safetensors
stores little-endian bytes; the in-memory side assumes a little-endian machine, as x86 and ARM are.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import dtype_name
from ..files import OpenFiles, writable_view
from ..sources.run import load_source

if TYPE_CHECKING:
    import torch

_CHUNK = 64 * 2**20


def _describe(name: str, dtype: str, shape, nbytes: int) -> bytes:
    return (json.dumps([name, dtype, list(shape), nbytes]) + "\n").encode()


def folder_fingerprint(folder: str | Path) -> str:
    """The fingerprint of a model folder's safetensors weights (single file or sharded), read in chunks.

    Raises:
        `DataError`: the folder has no readable safetensors weights.
    """
    source = load_source(Path(folder), 0)
    digest = hashlib.sha256()
    with OpenFiles(identities=source.identities) as files:
        for name in sorted(source.tensors):
            info = source.tensors[name]
            digest.update(_describe(name, info.dtype, info.shape, info.nbytes))
            for path, offset, nbytes in info.ranges(0, info.numel):  # any layout, chunk by chunk
                for start in range(0, nbytes, _CHUNK):
                    chunk = bytearray(min(_CHUNK, nbytes - start))
                    files.read_into(path, offset + start, memoryview(chunk))
                    digest.update(chunk)
    return digest.hexdigest()


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint of in-memory tensors (e.g. a model's `state_dict()`), copied to the CPU one at a time."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(_describe(name, dtype_name(tensor.dtype), tensor.shape, tensor.nbytes))
        if tensor.nbytes:
            digest.update(writable_view(tensor))
    return digest.hexdigest()
