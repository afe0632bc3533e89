"""Write a large synthetic LoRA run for benchmarks: a base model and `checkpoint-N` folders of PEFT adapters.

The base is `scripts/synthetic_run.py`'s (Llama-like names and shapes, bf16 by default, written tensor by tensor);
each checkpoint holds `adapter_config.json` and `adapter_model.safetensors`, with float32 factors of rank r on every
linear layer of every block (q, k, v, o, gate, up, down), as peft saves them for a bf16 model. The factors follow a
random walk from step to step, B starting from small values (a trained adapter's B is no longer 0).

    python scripts/bench_lora.py /tmp/bema-bench/lora-1g --size 1GiB --checkpoints 8 --rank 16

The run is `ROOT/base/` and `ROOT/run/checkpoint-{400,800,...}/`; `ROOT/spec.json` records what was generated, and
an existing run with the same spec is reused. `scripts/bench.py lora` times `bema-average` on it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_run import SAVE_STEPS, VOCAB, make_synthetic_run, parse_size  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."


def make_lora_run(
    root: str | Path, *, size: int, checkpoints: int, rank: int = 16, dtype: str = "bfloat16", seed: int = 0, vocab: int = VOCAB
) -> tuple[Path, Path]:
    """Write (or reuse) `root/base` and `root/run/checkpoint-N` (adapters); return (run_dir, base_dir).

    Args:
        root (`str | Path`): folder of the run.
        size (`int`): bytes of the base model's weights (approximate).
        checkpoints (`int`): number of adapter checkpoints, at steps 400, 800, ...
        rank (`int`, defaults to 16): the adapters' rank, on every linear layer (lora_alpha = 2·rank).
        dtype (`str`, defaults to "bfloat16"): the base's dtype; the factors are float32.
        seed (`int`, defaults to 0): random seed.
        vocab (`int`, defaults to 32000): rows of the embedding (small for tiny test runs).
    """
    root = Path(root)
    spec = {"size": size, "checkpoints": checkpoints, "rank": rank, "dtype": dtype, "seed": seed, "vocab": vocab, "version": 1}
    run_dir, base_dir = root / "run", root / "base"
    spec_path = root / "spec.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return run_dir, base_dir
    if root.exists():
        shutil.rmtree(root)
    _, base_dir = make_synthetic_run(root / "synthetic", size=size, checkpoints=0, dtype=dtype, seed=seed, vocab=vocab)
    base_dir = base_dir.rename(root / "base")
    shutil.rmtree(root / "synthetic")
    from safetensors import safe_open

    with safe_open(base_dir / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    modules = {name.removesuffix(".weight"): shape for name, shape in shapes.items() if name.rpartition(".")[0].endswith(TARGETS)}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "base_model_name_or_path": str(base_dir.resolve()), "bias": "none",
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for module, (out_features, in_features) in modules.items():
        factors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        factors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 1e-3
    steps = [SAVE_STEPS * (i + 1) for i in range(checkpoints)]
    for step in steps:
        for value in factors.values():
            value.add_(torch.randn(value.shape, generator=generator), alpha=1e-4)
        folder = run_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(factors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": steps[-1], "save_steps": SAVE_STEPS}))
    spec_path.write_text(json.dumps(spec))
    return run_dir, base_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", default="1GiB", help="bytes of the base model, e.g. 256MiB, 1GiB")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run_dir, base_dir = make_lora_run(args.root, size=parse_size(args.size), checkpoints=args.checkpoints, rank=args.rank, dtype=args.dtype, seed=args.seed)
    print(f"run: {run_dir}\nbase: {base_dir}")


if __name__ == "__main__":
    main()
