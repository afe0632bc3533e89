"""Write tiny training runs in the sharded layouts, with the libraries that write them, on CPU: run by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/sources/sharded_writers.py OUT [--deepspeed]

Each run is `OUT/<name>/base` (the model before training, `save_pretrained`) and `OUT/<name>/run/checkpoint-{2,4}`:
- `fsdp`: FSDP2 (`fully_shard`, gloo) and accelerate's own `save_fsdp_model` with `SHARDED_STATE_DICT`, which writes
  `pytorch_model_fsdp_0/` exactly as the Trainer does on GPUs (accelerate turns FSDP on only on accelerators, so
  the Trainer itself cannot be used on CPU);
- `columns/pytorch_model_fsdp_0`: `torch.distributed.checkpoint.save` of DTensors sharded along dim 1 (as tensor
  parallelism shards them): chunks that are not whole rows;
- `zero1`, `zero2`, `zero3` (with `--deepspeed`): `deepspeed.initialize` and `save_checkpoint`, as the Trainer calls
  them, plus the `config.json` the Trainer writes beside them. `model.norm.weight` is frozen (DeepSpeed stores
  frozen parameters apart), and `zero2` ties its embeddings.

Weights are fp32 (FSDP) and bf16 with fp32 master weights (DeepSpeed: ZeRO-1 runs its BF16_Optimizer, ZeRO-2 and 3
their own), on a Llama model with a hidden size of 33 and 67 vocabulary rows: odd sizes, so that dim-0 chunks are
uneven across 2 ranks and ZeRO pads its partitions.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

STEPS = (2, 4)


def tiny_model(*, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=67, hidden_size=33, head_dim=8, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def batches(step: int) -> torch.Tensor:
    return torch.randint(0, 67, (2, 8), generator=torch.Generator().manual_seed(1000 + step + 17 * dist.get_rank()))


def write_fsdp(root: Path) -> None:
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import save_fsdp_model
    from torch.distributed.fsdp import fully_shard

    state = PartialState(cpu=True)
    model = tiny_model()
    if state.is_main_process:
        model.save_pretrained(root / "base")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    for step in range(1, max(STEPS) + 1):
        ids = batches(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in STEPS:
            save_fsdp_model(plugin, state, model, root / "run" / f"checkpoint-{step}")


def write_columns(folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    full = {"wide": torch.randn(5, 7), "cube": torch.randn(3, 5, 4).to(torch.bfloat16)}
    dcp.save({name: distribute_tensor(t, mesh, [Shard(1)]) for name, t in full.items()}, checkpoint_id=folder / "pytorch_model_fsdp_0")


def write_deepspeed(root: Path, stage: int, *, tied: bool) -> None:
    import deepspeed
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None  # a CPU speed-up op that DeepSpeed compiles on first use
    model = tiny_model(tied=tied)
    model.model.norm.weight.requires_grad_(False)
    if dist.get_rank() == 0:
        model.save_pretrained(root / "base")
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": True},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    for step in range(1, max(STEPS) + 1):
        ids = batches(step)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        if step in STEPS:
            folder = root / "run" / f"checkpoint-{step}"
            engine.save_checkpoint(folder)
            if dist.get_rank() == 0:
                model.config.save_pretrained(folder)
                (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "save_steps": 2}))


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    write_fsdp(out / "fsdp")
    write_columns(out / "columns")
    if "--deepspeed" in sys.argv:
        for stage in (1, 2, 3):
            write_deepspeed(out / f"zero{stage}", stage, tied=stage == 2)
    dist.barrier()  # every rank's files are complete and closed
    sys.stdout.flush(), sys.stderr.flush()
    # skip the interpreter's teardown: destroying DeepSpeed's and gloo's process groups and threads there now and
    # then aborts a rank ("terminate called without an active exception") after all was written
    os._exit(0)


if __name__ == "__main__":
    main()
