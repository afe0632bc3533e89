"""Distributed runs: ranks own whole shards; the output is byte-identical to a single process's; errors stop all."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
from synthetic import make_run

from bema_offline import UsageError
from bema_offline.engine.distributed import assign_shards, join, launched

SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (16, 8) for i in range(5)} | {"model.norm.weight": (8,)}


def test_assign_shards_is_disjoint_balanced_and_deterministic():
    sizes = {f"s{i}": size for i, size in enumerate([9, 7, 6, 5, 5, 4, 2, 1])}
    owned = assign_shards(sizes, 3)
    assert sorted(n for names in owned for n in names) == sorted(sizes)
    loads = [sum(sizes[n] for n in names) for names in owned]
    assert max(loads) - min(loads) <= max(sizes.values()) and sorted(loads) == [13, 13, 13]
    assert assign_shards(sizes, 3) == owned
    assert assign_shards({"a": 1}, 3) == [["a"], [], []]


def test_join_is_none_for_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched() and join() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join() is None


def test_join_without_a_launcher_says_how(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="start the ranks with torchrun"):
        join()


def torchrun(nproc, args, env=None):
    """`torchrun --standalone --nproc-per-node N -m bema_offline average ARGS`, as a user runs it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bema_offline", "average", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def single(args):
    command = [sys.executable, "-m", "bema_offline", "average", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def assert_same_tree(a, b):
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        if rel.name == "bema_offline.json":  # the provenance says when it was made
            record_a, record_b = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
            record_a.pop("created"), record_b.pop("created")
            assert record_a == record_b, rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.parametrize("shard_size, nproc", [("1000", 2), ("1GB", 2)])
def test_two_ranks_write_what_one_process_writes(tmp_path, shard_size, nproc):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6, 8], shapes=SHAPES)
    args = [run_dir, "--base-model", base_dir, "--update-freq", "2", "--max-shard-size", shard_size, "--save", "ema,bema",
            "--grid", "ema_power=0.3,0.5"]
    one = single([*args, "-o", tmp_path / "one", "-q"])
    assert one.returncode == 0, one.stderr
    many = torchrun(nproc, [*args, "-o", tmp_path / "many"])
    assert many.returncode == 0, many.stderr
    assert_same_tree(tmp_path / "one", tmp_path / "many")
    shards = list((tmp_path / "many" / "ema_power=0.3" / "bema").glob("*.safetensors"))
    assert len(shards) == (1 if shard_size == "1GB" else 5)
    assert many.stdout.count("wrote ") == 4  # rank 0 reports, the other rank is quiet
    if shard_size == "1GB":
        assert "1 output shards for 2 ranks: 1 ranks had no work" in many.stderr
    assert not list(tmp_path.glob(".many.bema-*"))


def test_an_error_on_one_rank_stops_every_rank_and_publishes_nothing(tmp_path):
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4, 6, 8], shapes=SHAPES)
    # five shards of one tensor each (the norm joins the last): rank 0 owns the largest, the last, and rank 1 the
    # first, where layer 0 is; it gets a NaN at step 6
    name = "model.layers.0.mlp.up_proj.weight"
    path = run_dir / "checkpoint-6" / "model.safetensors"
    tensors = load_file(path)
    tensors[name][3, 3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "out"
    result = torchrun(2, [run_dir, "--base-model", base_dir, "--update-freq", "2", "--max-shard-size", "1000", "-o", out, "-q"])
    assert result.returncode != 0
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith(f"error: rank 1 of 2 failed while writing its shards: tensor '{name}' has NaN or Inf values at step 6")
    assert errors[1].startswith(f"error: tensor '{name}' has NaN or Inf values at step 6")
    # (torchrun itself then prints a traceback of its own, naming the failed ranks)
    assert not out.exists() and not list(tmp_path.glob(".out.bema-*"))
