"""Synthetic Trainer runs for tests: a base model and `checkpoint-N` folders with random-walk weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (50, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.q_proj.bias": (8,),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.norm.weight": (8,),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32", "hidden_size": 8}


def save_weights(folder: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1) -> None:
    """Save like `save_pretrained`: one `model.safetensors`, or `shards` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def make_run(
    root: Path,
    steps: list[int],
    *,
    shapes: dict[str, tuple[int, ...]] = TINY_SHAPES,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    seed: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
    frozen: tuple[str, ...] = (),
) -> tuple[Path, Path, dict[int, dict[str, torch.Tensor]]]:
    """Write `root/base` and `root/run/checkpoint-N` for N in `steps`; return (run_dir, base_dir, weights by step).

    Weights follow a random walk; tensors named in `frozen` stay constant; `extra` tensors (e.g. non-float)
    are saved unchanged at every step.
    """
    generator = torch.Generator().manual_seed(seed)
    current = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
    current.update(extra or {})
    base_dir, run_dir = root / "base", root / "run"
    save_weights(base_dir, current, shards=shards)
    (base_dir / "config.json").write_text(json.dumps(CONFIG))
    weights = {0: dict(current)}
    previous = 0
    for step in steps:
        scale = ((step - previous) ** 0.5) * 0.05
        current = {
            name: t if (name in frozen or not t.is_floating_point()) else (t.float() + scale * torch.randn(t.shape, generator=generator)).to(dtype)
            for name, t in current.items()
        }
        previous = step
        folder = run_dir / f"checkpoint-{step}"
        save_weights(folder, current, shards=shards)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": steps[-1], "save_steps": steps[0]}))
        weights[step] = dict(current)
    return run_dir, base_dir, weights
