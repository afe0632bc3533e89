"""Rewrite a synthetic safetensors run (`scripts/synthetic_run.py`) in another checkpoint layout, for benchmarks.

    python scripts/layout_runs.py /tmp/bema-bench/run-layouts /tmp/bema-bench/run-layouts-bin --layout bin

Layouts, each holding the very same weights as the safetensors run:
- `bin`: `torch.save(state_dict)` as `pytorch_model.bin`, base model included (an older run);
- `dcp`: `torch.distributed.checkpoint.save` into `pytorch_model_fsdp_0/` (one process, so one `__0_0.distcp`);
- `zero3`: DeepSpeed ZeRO-3's layout for 2 ranks, written with torch.save in DeepSpeed's own structure
  (`fp32_flat_groups` partitions, each parameter split in two and padded; `param_shapes` in the model states), as
  its fp32 master weights: the run must be float32. The optimizer's moments are left out (they are never read).
The DCP and ZeRO runs use the safetensors base model, as a real run would.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

WORLD_SIZE = 2


def write_zero3(state: dict[str, torch.Tensor], folder: Path, step: int) -> None:
    tag = folder / f"global_step{step}"
    tag.mkdir(parents=True)
    shapes = OrderedDict((name, t.shape) for name, t in state.items())
    flats = []
    for rank in range(WORLD_SIZE):
        pieces = []
        for t in state.values():
            per_rank = math.ceil(t.numel() / WORLD_SIZE)
            piece = t.reshape(-1)[rank * per_rank : (rank + 1) * per_rank].float()
            pieces += [piece, torch.zeros(per_rank - piece.numel())]  # the last rank's padding
        flats.append(torch.cat(pieces))
    for rank, flat in enumerate(flats):
        optimizer = {"zero_stage": 3, "partition_count": WORLD_SIZE, "fp32_flat_groups": [flat], "loss_scaler": None,
                     "optimizer_state_dict": {"state": {}, "param_groups": []}}
        torch.save({"optimizer_state_dict": optimizer, "ds_version": "bench"}, tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        module = OrderedDict((name, torch.empty(0, dtype=torch.bfloat16)) for name in state)
        torch.save({"module": module, "buffer_names": [], "param_shapes": [shapes], "frozen_param_shapes": None, "shared_params": {},
                    "frozen_param_fragments": None, "ds_version": "bench"}, tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    (folder / "latest").write_text(tag.name)


def convert(source: Path, target: Path, layout: str) -> None:
    folders = [("base", source / "base")] + [(f"run/{p.name}", p) for p in sorted((source / "run").glob("checkpoint-*"))]
    for relative, folder in folders:
        out = target / relative
        out.mkdir(parents=True)
        if (folder / "config.json").is_file():
            shutil.copy(folder / "config.json", out / "config.json")
        if relative == "base" and layout != "bin":
            shutil.copy(folder / "model.safetensors", out / "model.safetensors")
            continue
        state = load_file(folder / "model.safetensors")
        if layout == "bin":
            torch.save(state, out / "pytorch_model.bin")
        elif layout == "dcp":
            import torch.distributed.checkpoint as dcp

            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(state, checkpoint_id=out / "pytorch_model_fsdp_0", no_dist=True)
        else:
            if any(t.dtype != torch.float32 for t in state.values()):
                raise SystemExit("zero3 holds fp32 master weights: generate the run with --dtype float32")
            write_zero3(state, out, int(folder.name.split("-")[1]))
        del state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a synthetic run's root (with base/ and run/)")
    parser.add_argument("target", type=Path)
    parser.add_argument("--layout", choices=("bin", "dcp", "zero3"), required=True)
    args = parser.parse_args()
    spec = {"source": str(args.source.resolve()), "layout": args.layout, "source_spec": json.loads((args.source / "spec.json").read_text())}
    if (args.target / "spec.json").is_file() and json.loads((args.target / "spec.json").read_text()) == spec:
        return
    shutil.rmtree(args.target, ignore_errors=True)
    convert(args.source, args.target, args.layout)
    (args.target / "spec.json").write_text(json.dumps(spec))


if __name__ == "__main__":
    main()
