"""Helpers for the tests of the `.bin`, FSDP and DeepSpeed readers: read a tensor back through its extents, build a
tiny model's state dicts along a run, and craft the bytes of broken `torch.save` archives."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bema_offline.sources.tensors import TensorInfo


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """A tensor's values, read through its extents with positioned reads, as the engine reads them."""
    data = bytearray()
    for path, offset, nbytes in info.ranges(0, info.numel):
        fd = os.open(path, os.O_RDONLY)
        try:
            data += os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
    if not data:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(data, dtype=info.torch_dtype).reshape(info.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat_a, flat_b = a.detach().reshape(-1).contiguous(), b.detach().reshape(-1).contiguous()
    return flat_a.numel() == 0 or torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def tiny_model(*, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def run_state_dicts(steps: list[int], *, tied: bool = True) -> tuple[LlamaForCausalLM, dict[int, dict[str, torch.Tensor]]]:
    """A tiny model and its state dicts along a run (step 0: the base): a random walk of its float tensors. Each
    state dict is the model's own, so tied weights share storage as `model.state_dict()` returns them."""
    model = tiny_model(tied=tied)
    generator = torch.Generator().manual_seed(1)
    states = {0: {name: t.clone() for name, t in model.state_dict().items()}}
    for step in steps:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        states[step] = {name: t.clone() for name, t in model.state_dict().items()}
        if tied:
            states[step]["lm_head.weight"] = states[step]["model.embed_tokens.weight"]
    if tied:
        states[0]["lm_head.weight"] = states[0]["model.embed_tokens.weight"]
    return model, states


def torch_save_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def with_pickle(archive: bytes, pickled: bytes) -> bytes:
    """The same `torch.save` archive with its `data.pkl` replaced (entries rewritten with Python's zipfile, stored)."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            target.writestr(item.filename, pickled if item.filename.endswith("/data.pkl") else source.read(item))
    return out.getvalue()


def recompressed(archive: bytes) -> bytes:
    """The same archive with every entry deflated, as a zip tool might rewrite it."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            target.writestr(item.filename, source.read(item))
    return out.getvalue()


class RunsCommand:
    """An object whose unpickling runs a shell command: what a malicious `.bin` holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_bin(marker: Path) -> bytes:
    """A real `torch.save` archive of a state dict whose unpickling would run `touch marker`."""
    return torch_save_bytes({"model.norm.weight": torch.ones(3), "payload": RunsCommand(f"touch {marker}")})
