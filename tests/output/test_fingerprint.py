"""Fingerprints: a folder's safetensors and the same tensors in memory agree; any change shows."""

from __future__ import annotations

import torch
from synthetic import save_weights

from bema_offline.output.fingerprint import folder_fingerprint, tensors_fingerprint


def test_folder_and_memory_agree_single_and_sharded(tmp_path) -> None:
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.bias": torch.randn(7, dtype=torch.float64).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.scalar": torch.tensor(1.5),
    }
    save_weights(tmp_path / "one", tensors)
    save_weights(tmp_path / "two", tensors, shards=2)
    expected = tensors_fingerprint(tensors)
    assert folder_fingerprint(tmp_path / "one") == expected
    assert folder_fingerprint(tmp_path / "two") == expected
    # a non-contiguous view hashes as its values
    transposed = dict(tensors, **{"b.weight": tensors["b.weight"].t().contiguous().t()})
    assert tensors_fingerprint(transposed) == expected


def test_any_change_shows(tmp_path) -> None:
    tensors = {"w": torch.randn(4, 4)}
    base = tensors_fingerprint(tensors)
    bumped = tensors["w"].clone()
    bumped[2, 3] = torch.nextafter(bumped[2, 3], torch.tensor(float("inf")))  # one ulp
    assert tensors_fingerprint({"w": bumped}) != base
    assert tensors_fingerprint({"w": tensors["w"].double()}) != base  # same values, another dtype
    assert tensors_fingerprint({"w": tensors["w"].reshape(2, 8)}) != base  # same bytes, another shape
    assert tensors_fingerprint({"v": tensors["w"]}) != base  # another name
