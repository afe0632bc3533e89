"""Benchmark of the LoRA arithmetic (`bema_offline/engine/lora.py`) on the issue's case: a 1 GiB bf16 base, 8 adapter
checkpoints with r = 16 on every linear layer.

The arithmetic runs in memory, on a Llama-shaped layer (hidden 2048, intermediate 5632, 4 KV heads of 64: the shapes
of TinyLlama-1.1B) repeated 12 times (1.0 GiB of bf16 weights), block by block on a pool of worker threads with one
torch thread each, as the engine runs; every output block is cast to bf16. Beside it, in the same run, the floors
that the issue's budget is stated in: a `cat` of a 1 GiB file (warm page cache) and a `dd` of 1 GiB with fsync.

    python scripts/bench_lora.py --repeat 3

Rows: the cast alone (bf16 -> float32 -> bf16, the work any merged output does), the exact average (one matmul of the
stacked factors per tile), `--lora-average factors`, and DoRA (one matmul and one norm per checkpoint per block).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bema_offline.engine.engine import default_threads  # noqa: E402
from bema_offline.engine.lora import TILE_ROWS, ModuleAverage  # noqa: E402
from bema_offline.sources.peft import LoraModule, ModuleFactors  # noqa: E402

GIB = 2**30
HIDDEN, INTERMEDIATE, KV = 2048, 5632, 256
LAYER = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate": (INTERMEDIATE, HIDDEN), "up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}
LAYERS = 12


def module(name: str, shape: tuple[int, int], rank: int, dora: bool) -> LoraModule:
    return LoraModule(name, f"{name}.weight", f"{name}.weight", shape, rank, 2.0 * rank, 2.0, False, False, f"{name}.A", f"{name}.B", f"{name}.m" if dora else None)


def layer_inputs(checkpoints: int, rank: int, dora: bool) -> list[tuple[LoraModule, torch.Tensor, dict[int, ModuleFactors]]]:
    """One layer: each module's W0 (bf16) and every checkpoint's factors (float32)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for name, (rows, cols) in LAYER.items():
        w0 = (torch.randn(rows, cols, generator=generator) * 0.02).bfloat16()
        factors = {
            step: ModuleFactors(
                A=torch.randn(rank, cols, generator=generator) * 0.01,
                B=torch.randn(rows, rank, generator=generator) * 0.01,
                magnitude=w0.float().norm(dim=1) if dora else None,
            )
            for step in range(1, checkpoints + 1)
        }
        inputs.append((module(name, (rows, cols), rank, dora), w0, factors))
    return inputs


def run_case(inputs, weights, *, mode: str | None, threads: int, block_rows: int) -> tuple[float, float]:
    """(wall, CPU) seconds to produce every output block of `LAYERS` layers (bf16), or only to cast W0 when `mode`
    is None. CPU time is the process's, all threads: on a shared machine it moves less than the wall time."""
    averages = {m.module: ModuleAverage(m, f, weights, mode=mode) for m, _, f in inputs} if mode else {}

    def work(task):
        m, w0, start = task
        rows = w0[start : start + block_rows]
        out = averages[m.module].rows(rows, start) if mode else rows.float()
        return out.bfloat16().numel()

    tasks = [(m, w0, start) for _ in range(LAYERS) for m, w0, _ in inputs for start in range(0, m.shape[0], block_rows)]
    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(work, tasks))
    assert done == LAYERS * sum(m.shape[0] * m.shape[1] for m, _, _ in inputs)
    return time.perf_counter() - started, time.process_time() - cpu


def floors(root: Path) -> tuple[float, float]:
    """(cat of a 1 GiB file with a warm page cache, dd of 1 GiB with fsync), seconds."""
    path = root / "one-gib"
    if not path.exists() or path.stat().st_size != GIB:
        with open(path, "wb") as f:
            for _ in range(GIB // 2**24):
                f.write(os.urandom(2**24))
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    started = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    cat = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={root / 'dd-out'}", "bs=1M", f"count={GIB // 2**20}", "conv=fsync"], capture_output=True, check=True)
    dd = time.perf_counter() - started
    (root / "dd-out").unlink()
    return cat, dd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--block-rows", type=int, default=4 * TILE_ROWS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "bema-lora-bench")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # workers, not intra-op threads, as the engine runs
    weights = {0: -0.05, **{step: 1.05 / args.checkpoints for step in range(1, args.checkpoints + 1)}}
    elements = LAYERS * sum(rows * cols for rows, cols in LAYER.values())
    flops = 2 * elements * args.rank * args.checkpoints
    print(f"base: {elements * 2 / GIB:.2f} GiB bf16 ({LAYERS} layers of {', '.join(LAYER)}), {args.checkpoints} checkpoints, r={args.rank}, "
          f"{args.threads} worker threads, blocks of {args.block_rows} rows, torch {torch.__version__}")
    results = {}
    plain = layer_inputs(args.checkpoints, args.rank, dora=False)
    dora = layer_inputs(args.checkpoints, args.rank, dora=True)
    for label, inputs, mode in (("cast only (bf16 -> fp32 -> bf16)", plain, None), ("exact", plain, "exact"),
                                ("factors (--lora-average factors)", plain, "factors"), ("DoRA (merged)", dora, "exact")):
        times = [run_case(inputs, weights, mode=mode, threads=args.threads, block_rows=args.block_rows) for _ in range(args.repeat)]
        results[label] = (statistics.median(t for t, _ in times), statistics.median(c for _, c in times))
    cat, dd = floors(args.root)
    print(f"{'case':<36} {'wall s':>7} {'CPU s':>7} {'GFLOP/s':>8}  (medians of {args.repeat}; load average {os.getloadavg()[0]:.1f})")
    for label, (seconds, cpu) in results.items():
        rate = f"{flops / seconds / 1e9:8.1f}" if label == "exact" else f"{'':>8}"
        print(f"{label:<36} {seconds:7.2f} {cpu:7.2f} {rate}")
    print(f"{'cat of 1 GiB (warm page cache)':<36} {cat:7.2f}")
    print(f"{'dd of 1 GiB, fsynced':<36} {dd:7.2f}")
    print(f"issue budget for the merged output, 1.5 x (cat + dd): {1.5 * (cat + dd):.2f} s")


if __name__ == "__main__":
    main()
