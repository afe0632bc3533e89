"""The naive way to compute BEMA offline, for benchmarks: load whole checkpoints, keep full fp32 state dicts.

This is how the paper authors' offline code (abblock/bema, `core_offline.py`) works: each checkpoint is loaded
whole, and θ0 and the EMA are kept as complete fp32 state dicts. It replays TRL's ops with TRL's clock, so its
output equals `bema-average`'s bit for bit; only the memory and the time differ.

Usage:

    python scripts/naive_baseline.py RUN_DIR --base-model BASE_DIR --output OUT [--update-freq 400]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or sharded), loaded whole."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    return load_file(folder / "model.safetensors")


def naive_bema(run_dir: Path, base_dir: Path, *, update_freq: int, ema_power: float, bias_power: float, lag: float) -> dict:
    steps = sorted(int(m.group(1)) for p in run_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    update_steps = [s for s in steps if s % update_freq == 0]
    theta0 = {name: t.float() for name, t in load_state_dict(base_dir).items()}
    ema = {name: t.clone() for name, t in theta0.items()}
    dtypes = {}
    for step in update_steps:
        state = load_state_dict(run_dir / f"checkpoint-{step}")
        x = lag + step
        beta, alpha = x**-ema_power, x**-bias_power
        for name, t in state.items():
            dtypes[name] = t.dtype
            ema[name].mul_(1 - beta).add_(t.float(), alpha=beta)
        last = state
    return {name: (ema[name] + alpha * (last[name].float() - theta0[name])).to(dtypes[name]) for name in ema}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--update-freq", type=int, default=400)
    parser.add_argument("--ema-power", type=float, default=0.5)
    parser.add_argument("--bias-power", type=float, default=0.2)
    parser.add_argument("--lag", type=float, default=10)
    args = parser.parse_args()
    started = time.perf_counter()  # after the imports, like bema-average's own summary line
    bema = naive_bema(
        args.run_dir, args.base_model, update_freq=args.update_freq, ema_power=args.ema_power, bias_power=args.bias_power, lag=args.lag
    )
    args.output.mkdir(parents=True, exist_ok=True)
    save_file(bema, args.output / "model.safetensors", metadata={"format": "pt"})
    print(f"computed in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
