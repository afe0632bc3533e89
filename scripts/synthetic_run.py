"""Write a large synthetic Trainer run for benchmarks: a base model and `checkpoint-N` folders.

Tensors have Llama-like names and shapes, and their weights follow a random walk from step to step. Files are
written tensor by tensor with `pwrite`, so generating a run of many GiB needs memory for one tensor only.

Usage:

    python scripts/synthetic_run.py /tmp/bema-bench/run-1g --size 1GiB --checkpoints 8 [--dtype bfloat16] [--shards 1]

The run is `ROOT/base/` and `ROOT/run/checkpoint-{400,800,...}/` (TRL's default `update_freq` is 400). A file
`ROOT/spec.json` records what was generated; an existing run with the same spec is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch

DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float32": (torch.float32, "F32"), "float16": (torch.float16, "F16")}
SAVE_STEPS = 400
VOCAB = 32000
# (hidden size, intermediate size, attention heads, key/value heads): Llama-like widths, smallest first.
WIDTHS = [(512, 1408, 8, 8), (1024, 2816, 16, 16), (2048, 5632, 32, 4), (4096, 11008, 32, 32)]


def llama_shapes(target_bytes: int, itemsize: int, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor shapes adding up to about `target_bytes`: the widest width that still has 4 layers."""
    target = target_bytes // itemsize
    for hidden, inter, heads, kv_heads in reversed(WIDTHS):
        kv = hidden // heads * kv_heads
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
        layers = round((target - vocab * hidden - hidden) / per_layer)
        if layers >= 4 or hidden == WIDTHS[0][0]:
            break
    layers = max(1, layers)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def _shard(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Split names, in order, into `shards` groups of about equal bytes."""
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    done = 0
    for name in names:
        if groups[-1] and len(groups) < shards and done >= total * len(groups) / shards:
            groups.append([])
        groups[-1].append(name)
        done += sizes[name]
    return groups


def _create_files(folder: Path, shapes: dict[str, tuple[int, ...]], dtype_name: str, itemsize: int, shards: int):
    """Create the folder's safetensors files at full size with their headers; return {name: (path, offset)}."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {name: math.prod(shape) * itemsize for name, shape in shapes.items()}
    groups = _shard(list(shapes), sizes, shards)
    places, weight_map = {}, {}
    for i, group in enumerate(groups):
        file_name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in group:
            header[name] = {"dtype": dtype_name, "shape": list(shapes[name]), "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = folder / file_name
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
        start = 8 + len(raw)
        for name in group:
            places[name] = (path, start)
            weight_map[name] = file_name
            start += sizes[name]
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return places


def make_synthetic_run(
    root: str | Path,
    *,
    size: int,
    checkpoints: int,
    dtype: str = "bfloat16",
    shards: int = 1,
    seed: int = 0,
    vocab: int = VOCAB,
) -> tuple[Path, Path]:
    """Write (or reuse) `root/base` and `root/run/checkpoint-N`; return (run_dir, base_dir).

    Args:
        root (`str | Path`): folder of the run.
        size (`int`): bytes of weights per checkpoint (approximate).
        checkpoints (`int`): number of `checkpoint-N` folders, at steps 400, 800, ...
        dtype (`str`, defaults to "bfloat16"): "bfloat16", "float16" or "float32".
        shards (`int`, defaults to 1): safetensors files per checkpoint (with an index when more than one).
        seed (`int`, defaults to 0): random seed.
        vocab (`int`, defaults to 32000): rows of the embedding (small for tiny test runs).
    """
    root = Path(root)
    torch_dtype, dtype_name = DTYPES[dtype]
    spec = {"size": size, "checkpoints": checkpoints, "dtype": dtype, "shards": shards, "seed": seed, "version": 1}
    if vocab != VOCAB:
        spec["vocab"] = vocab
    run_dir, base_dir = root / "run", root / "base"
    spec_path = root / "spec.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return run_dir, base_dir
    if root.exists():
        shutil.rmtree(root)
    itemsize = torch_dtype.itemsize
    shapes = llama_shapes(size, itemsize, vocab)
    hidden = shapes["model.embed_tokens.weight"][1]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": sum(1 for n in shapes if n.endswith("input_layernorm.weight")),
        "vocab_size": vocab,
        "torch_dtype": dtype,
        "tie_word_embeddings": True,
    }
    steps = [SAVE_STEPS * (i + 1) for i in range(checkpoints)]
    folders = [base_dir] + [run_dir / f"checkpoint-{step}" for step in steps]
    places = [_create_files(folder, shapes, dtype_name, itemsize, shards) for folder in folders]
    for folder, step in zip(folders, [0] + steps):
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        if step:
            state = {"global_step": step, "max_steps": steps[-1], "save_steps": SAVE_STEPS}
            (folder / "trainer_state.json").write_text(json.dumps(state))
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=generator)  # noise is drawn from rotations of a fixed pool: fast
    fds: dict[Path, int] = {}
    try:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            weights = 0.02 * _noise(pool, numel, generator) + (1.0 if "norm" in name else 0.0)
            for place in places:
                path, offset = place[name]
                fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_WRONLY))
                data = weights.to(torch_dtype).view(torch.uint8).numpy()
                os.pwrite(fd, memoryview(data), offset)
                weights.add_(_noise(pool, numel, generator), alpha=0.001)
    finally:
        for fd in fds.values():
            os.close(fd)
    spec_path.write_text(json.dumps(spec))
    return run_dir, base_dir


def _noise(pool: torch.Tensor, numel: int, generator: torch.Generator) -> torch.Tensor:
    shift = int(torch.randint(len(pool), (1,), generator=generator))
    tiled = torch.cat([pool[shift:], pool[:shift]]).repeat(numel // len(pool) + 1)
    return tiled[:numel].clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", default="1GiB", help="bytes per checkpoint, e.g. 256MiB, 1GiB")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run_dir, base_dir = make_synthetic_run(
        args.root, size=parse_size(args.size), checkpoints=args.checkpoints, dtype=args.dtype, shards=args.shards, seed=args.seed
    )
    print(f"run: {run_dir}\nbase: {base_dir}")


def parse_size(text: str) -> int:
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


if __name__ == "__main__":
    main()
