"""Each layout averages to the same bits as the same run saved as safetensors; each broken one fails in one line and
writes nothing.

The references are the libraries' own readers: `torch.load` for `.bin`, DCP's loader for FSDP checkpoints, and
DeepSpeed's `zero_to_fp32` for ZeRO partitions; what they load is saved with `save_pretrained` or safetensors, and
averaged by the same code, so the outputs must agree to the last bit.
"""

import importlib.util
import shutil

import pytest
import torch
from hostile import run_cli, tree_fingerprint
from huggingface_hub import save_torch_state_dict
from layouts import malicious_bin, run_state_dicts, same_bits, torch_save_bytes, with_pickle
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bema_offline import BEMASchedule, average
from bema_offline.output.verify import verify
from bema_offline.sources.dcp import DCP_FOLDER

STEPS = [2, 4, 6]
SCHEDULE = BEMASchedule(update_freq=2)
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


def averaged(run_dir, base_dir, out):
    result = average(run_dir, out, schedule=SCHEDULE, base_model=base_dir)
    return load_file(result.outputs[0].path / "model.safetensors"), result


def assert_same_output(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert same_bits(a[name], b[name]), name


def save_run(root, model, states, layout):
    """`root/base` and `root/run/checkpoint-N`, each saved in `layout` ("safetensors" by save_pretrained, "bin" by
    torch.save, "bin-sharded" by huggingface_hub), or a layout per step (a dict)."""
    for step, state in states.items():
        folder = root / "base" if step == 0 else root / "run" / f"checkpoint-{step}"
        kind = layout[step] if isinstance(layout, dict) else layout
        folder.mkdir(parents=True)
        if kind == "safetensors":
            model.load_state_dict(state)
            model.save_pretrained(folder)
        elif kind == "bin":
            torch.save(state, folder / "pytorch_model.bin")
            model.config.save_pretrained(folder)
        else:
            save_torch_state_dict(state, folder, safe_serialization=False, max_shard_size=2000)
    return root / "run", root / "base"


@pytest.fixture(scope="module")
def tiny_run():
    return run_state_dicts(STEPS, tied=True)


@pytest.fixture(scope="module")
def safetensors_output(tiny_run, tmp_path_factory):
    model, states = tiny_run
    root = tmp_path_factory.mktemp("safetensors")
    run_dir, base_dir = save_run(root, model, states, "safetensors")
    return averaged(run_dir, base_dir, root / "out")[0]


@pytest.mark.parametrize(
    "layout",
    [
        "bin",
        {0: "bin", 2: "bin-sharded", 4: "bin", 6: "bin-sharded"},
        {0: "bin", 2: "safetensors", 4: "safetensors", 6: "safetensors"},  # a .bin base with safetensors checkpoints
        {0: "safetensors", 2: "bin", 4: "safetensors", 6: "bin-sharded"},
    ],
    ids=["bin", "bin-and-shards", "bin-base", "mixed"],
)
def test_bin_runs_average_as_safetensors(tiny_run, safetensors_output, tmp_path, layout):
    model, states = tiny_run
    run_dir, base_dir = save_run(tmp_path, model, states, layout)
    output, result = averaged(run_dir, base_dir, tmp_path / "out")
    assert_same_output(output, safetensors_output)
    assert "lm_head.weight" not in output  # tied: stored once, as save_pretrained stores it
    assert {source.layout for source in result.plan.sources.values()} >= {"pytorch .bin"}


def reference_run(root, run_dir, base_dir, load):
    """The same run with each checkpoint loaded by `load` (the library's own reader) and saved as safetensors."""
    for folder in sorted(run_dir.glob("checkpoint-*")):
        target = root / "run" / folder.name
        target.mkdir(parents=True)
        save_file({name: t.contiguous() for name, t in load(folder).items()}, target / "model.safetensors")
    return root / "run", base_dir


def test_fsdp_run_averages_as_safetensors(sharded_runs, tmp_path):
    run_dir, base_dir = sharded_runs / "fsdp" / "run", sharded_runs / "fsdp" / "base"

    def dcp_load(folder):
        dcp_to_torch_save(folder / DCP_FOLDER, tmp_path / "loaded.pt")
        return torch.load(tmp_path / "loaded.pt", weights_only=True)["model"]

    reference, _ = averaged(*reference_run(tmp_path / "reference", run_dir, base_dir, dcp_load), tmp_path / "ref-out")
    output, result = averaged(run_dir, base_dir, tmp_path / "out")
    assert_same_output(output, reference)
    assert result.plan.sources[4].layout == "fsdp sharded (dcp)"
    assert (result.outputs[0].path / "config.json").is_file()  # the checkpoints have none: the base model's
    report = verify(result.outputs[0].path, recompute=3, seed=0)[0]  # files in subfolders are found again
    assert report.recomputed and not [note for note in report.notes if "changed" in note], report.notes


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_run_averages_as_safetensors(sharded_runs, tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, base_dir = sharded_runs / f"zero{stage}" / "run", sharded_runs / f"zero{stage}" / "base"

    def zero_to_fp32(folder):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder))
        state.pop("lm_head.weight" if stage == 2 else "", None)  # tied: save_pretrained would leave it out
        if stage == 1:  # ZeRO-1 records no frozen parameter: the model's own copy is the weight
            tag = (folder / "latest").read_text().strip()
            state["model.norm.weight"] = torch.load(folder / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]["model.norm.weight"]
        return state

    reference, _ = averaged(*reference_run(tmp_path / "reference", run_dir, base_dir, zero_to_fp32), tmp_path / "ref-out")
    output, result = averaged(run_dir, base_dir, tmp_path / "out")
    assert_same_output(output, reference)
    assert result.plan.sources[4].layout == f"deepspeed zero-{stage} fp32 master weights"
    assert output["model.embed_tokens.weight"].dtype == torch.float32
    assert any("fp32 master weights" in note for note in result.plan.notes)
    report = verify(result.outputs[0].path, recompute=3, seed=0)[0]
    assert report.recomputed and not [note for note in report.notes if "changed" in note], report.notes


# --- broken inputs: one line, nothing written, inputs untouched --------------------------------------------------


def broken_bin(tmp_path, tiny_run, change):
    model, states = tiny_run
    run_dir, base_dir = save_run(tmp_path, model, states, "bin")
    path = run_dir / "checkpoint-4" / "pytorch_model.bin"
    path.write_bytes(change(path.read_bytes(), tmp_path))
    return run_dir, base_dir, path


def copied(sharded_runs, tmp_path, name):
    shutil.copytree(sharded_runs / name, tmp_path / name)
    return tmp_path / name / "run", tmp_path / name / "base"


def _truncated(tmp_path, tiny_run, sharded_runs):
    return (*broken_bin(tmp_path, tiny_run, lambda data, _: data[: len(data) - 300]), "not a torch.save zip archive")


def _bad_opcode(tmp_path, tiny_run, sharded_runs):
    return (*broken_bin(tmp_path, tiny_run, lambda data, _: with_pickle(data, b"\x80\x02\xfe.")), "malformed pickle")


def _runs_a_command(tmp_path, tiny_run, sharded_runs):
    return (*broken_bin(tmp_path, tiny_run, lambda _, root: malicious_bin(root / "pwned")), "system, which is neither a tensor")


def _scattered_view(tmp_path, tiny_run, sharded_runs):
    change = lambda data, _: torch_save_bytes({"model.embed_tokens.weight": torch.zeros(80, 80).T})  # noqa: E731
    return (*broken_bin(tmp_path, tiny_run, change), "non-contiguous view")


def _missing_distcp(tmp_path, tiny_run, sharded_runs):
    run_dir, base_dir = copied(sharded_runs, tmp_path, "fsdp")
    (run_dir / "checkpoint-4" / DCP_FOLDER / "__1_0.distcp").unlink()
    return run_dir, base_dir, run_dir / "checkpoint-4" / DCP_FOLDER / ".metadata", "__1_0.distcp, which is missing"


def _missing_partition(tmp_path, tiny_run, sharded_runs):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    run_dir, base_dir = copied(sharded_runs, tmp_path, "zero3")
    (run_dir / "checkpoint-2" / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return run_dir, base_dir, run_dir / "checkpoint-2" / "global_step2", "partitions for 2 ranks are expected but 1 were found"


@pytest.mark.parametrize("build", [_truncated, _bad_opcode, _runs_a_command, _scattered_view, _missing_distcp, _missing_partition])
def test_broken_inputs_fail_in_one_line_and_write_nothing(tmp_path, tiny_run, sharded_runs, build):
    run_dir, base_dir, named, words = build(tmp_path, tiny_run, sharded_runs)
    before = tree_fingerprint(tmp_path)
    code, _, stderr = run_cli([run_dir, "--base-model", base_dir, "--update-freq", "2", "--quiet"])
    assert code == 1 and stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert str(named) in stderr and words in stderr
    assert tree_fingerprint(tmp_path) == before  # nothing written, nothing changed, no staging left behind
    assert not (tmp_path / "pwned").exists()
