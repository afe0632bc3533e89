"""One engine on a run, in-process, writing the output folder as `bema-average` does, for `scripts/bench.py stepwise`.

    python scripts/stepwise_probe.py RUN_DIR BASE_DIR OUT {engine,stepwise} [--release-deletes]

`stepwise` runs the step-major engine with its state files beside the output; with `--release-deletes` each step's
weights are deleted once released (as `--no-keep-downloads` does: run it on a copy). It prints the largest disk
use of the state files seen at a release, and of the inputs still on disk, then `computed in X s` (the engine and
the writer, after the imports and the plan).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from bema_offline import BEMASchedule
from bema_offline.engine.engine import Engine
from bema_offline.engine.plan import make_plan
from bema_offline.engine.stepwise import StepwiseEngine
from bema_offline.output.writer import FolderSink, ModelFolderWriter, TensorSpec
from bema_offline.files import OpenFiles
from bema_offline.sources.run import run_cadence


def disk_bytes(folder: Path) -> int:
    """Blocks in use under `folder` (sparse state files count what was written)."""
    return sum(os.lstat(p).st_blocks * 512 for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("engine", choices=["engine", "stepwise"])
    parser.add_argument("--release-deletes", action="store_true")
    parser.add_argument("--max-memory", type=int, default=512 * 2**20)
    args = parser.parse_args()
    update_freq, _ = run_cadence(args.run_dir)
    plan = make_plan(args.run_dir, [("", BEMASchedule(update_freq=update_freq))], base_model_dir=args.base_dir)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    specs = [TensorSpec(info.name, plan.output_dtypes[info.name], info.shape) for info in plan.tensors]
    started = time.perf_counter()
    high = {"state": 0, "inputs": 0}
    with OpenFiles(writable=True, max_open=None) as files:
        writer = ModelFolderWriter(args.out, specs, max_shard_size=5 * 10**9, files=files)
        sink = FolderSink([writer])
        if args.engine == "engine":
            Engine(plan, sink, max_memory=args.max_memory).run()
        else:
            state_dir = args.out.parent / (args.out.name + ".state")

            def release(step: int) -> None:
                high["state"] = max(high["state"], disk_bytes(state_dir))
                folder = plan.sources[step].folder
                high["inputs"] = max(high["inputs"], sum(disk_bytes(plan.sources[s].folder) for s in plan.read_steps))
                if args.release_deletes:
                    for path in folder.glob("*.safetensors"):
                        path.unlink()

            StepwiseEngine(plan, sink, state_dir=state_dir, max_memory=args.max_memory, release=release).run()
            shutil.rmtree(state_dir, ignore_errors=True)
        writer.finish()
    print(f"state on disk at most {high['state']} bytes; inputs on disk at most {high['inputs']} bytes")
    print(f"computed in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
