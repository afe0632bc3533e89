"""Offline averaging must equal TRL's online ``BEMACallback`` bit for bit.

Each configuration is a real (tiny, fp32, CPU) TRL DPO run with a checkpoint at every BEMA update
step. TRL writes its online result to ``<run>/bema/``; ``bema_offline.average`` recomputes it from
the checkpoints, and every tensor must be identical (``torch.equal``, same dtype, same names).

TRL is a dev dependency and is imported plainly: a missing TRL is a failure, not a skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import trl  # noqa: F401  (plain import on purpose: no skip when TRL is missing)
from click.testing import CliRunner
from safetensors.torch import load_file

from bema_offline import BEMASchedule, average
from bema_offline.cli import average_command

from tiny_hf import make_tiny_qwen2, make_tokenizer, train_dpo_with_bema

# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# 1. TRL defaults except a small update_freq; θ0 is the base model folder (no checkpoint-0).
DEFAULTS_KW: dict[str, Any] = {"update_freq": 2}
DEFAULTS_STEPS = {"max_steps": 8, "save_steps": 2}

# 2. Burn-in, non-default lag/multiplier and an active clamp. θ0 is checkpoint-2 (step τ).
#    Update steps are 5, 8, 11; x = 3 + 2t = 13, 19, 25; raw β = 0.277, 0.229, 0.200, so
#    min_ema_multiplier = 0.25 binds at t = 8 and t = 11 but not at t = 5.
#    max_steps = 12 leaves checkpoint-12 *after* the last update step: it must not contribute.
#    Untied embeddings, so lm_head.weight is a separate trainable tensor here.
BURNIN_KW: dict[str, Any] = {
    "update_freq": 3,
    "update_after": 2,
    "lag": 3,
    "multiplier": 2.0,
    "min_ema_multiplier": 0.25,
}
BURNIN_STEPS = {"max_steps": 12, "save_steps": 1}


@dataclass(frozen=True)
class Run:
    """A finished TRL run: base model folder, run folder and the BEMA kwargs it used."""

    base: Path
    run_dir: Path
    bema_kwargs: dict[str, Any]
    max_steps: int


def _schedule(kw: dict[str, Any]) -> BEMASchedule:
    full = {
        "update_freq": 400,
        "ema_power": 0.5,
        "bias_power": 0.2,
        "lag": 10,
        "update_after": 0,
        "multiplier": 1.0,
        "min_ema_multiplier": 0.0,
    }
    full.update(kw)
    return BEMASchedule(**full)


def _update_steps(kw: dict[str, Any], max_steps: int) -> list[int]:
    tau = kw.get("update_after", 0)
    phi = kw["update_freq"]
    return [t for t in range(1, max_steps + 1) if t > tau and (t - tau) % phi == 0]


def _raw_beta(kw: dict[str, Any], t: int) -> float:
    # Exactly TRL's formula before the clamp: (ρ + γ·t)^(−κ).
    return (kw.get("lag", 10) + kw.get("multiplier", 1.0) * t) ** (-kw.get("ema_power", 0.5))


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a HF model folder (single file or sharded with an index)."""
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def _assert_bit_exact(trl_dir: Path, ours_dir: Path) -> None:
    theirs = _load_folder(trl_dir)
    ours = _load_folder(ours_dir)
    if "lm_head.weight" in theirs and "lm_head.weight" not in ours:
        # With tied embeddings save_pretrained drops lm_head.weight, and in TRL 1.16 the bema/
        # folder omits it too. Should a TRL version ever write it, it is the same storage as the
        # input embedding, so it must equal our embed_tokens tensor.
        assert torch.equal(theirs.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        o = ours[name]
        assert o.dtype == t.dtype, name
        assert o.shape == t.shape, name
        assert torch.equal(o, t), f"{name}: max |diff| = {(o.double() - t.double()).abs().max().item()}"


def _assert_moved(run: Run, ours_dir: Path) -> None:
    """The average must differ from the last checkpoint (and from θ0), so the test can fail."""
    ours = _load_folder(ours_dir)
    last = _load_folder(run.run_dir / f"checkpoint-{run.max_steps}")
    last_update = _update_steps(run.bema_kwargs, run.max_steps)[-1]
    at_last_update = _load_folder(run.run_dir / f"checkpoint-{last_update}")
    base = _load_folder(run.base)
    for other in (last, at_last_update, base):
        assert any(not torch.equal(ours[k], other[k]) for k in ours)
    # Training really moved the weights (lr is large enough), not just by rounding noise.
    assert max((last[k] - base[k]).abs().max().item() for k in base) > 1e-3


# --------------------------------------------------------------------------------------------
# Fixtures: one TRL run per configuration, shared by the module
# --------------------------------------------------------------------------------------------


def _make_run(
    root: Path, kw: dict[str, Any], steps: dict[str, int], *, tie_word_embeddings: bool
) -> Run:
    torch.manual_seed(0)
    tokenizer = make_tokenizer(root / "tokenizer")
    make_tiny_qwen2(root / "base", tokenizer, seed=0, tie_word_embeddings=tie_word_embeddings)
    run_dir = train_dpo_with_bema(
        root / "base", root / "run", bema_kwargs=kw, seed=0, **steps
    )
    # The fixture is only useful if every step the recurrence reads has a checkpoint.
    needed = _update_steps(kw, steps["max_steps"])
    if kw.get("update_after", 0) > 0:
        needed.append(kw["update_after"])
    for t in needed:
        assert (run_dir / f"checkpoint-{t}" / "model.safetensors").is_file(), t
    assert (run_dir / "bema" / "model.safetensors").is_file()
    return Run(root / "base", run_dir, dict(kw), steps["max_steps"])


@pytest.fixture(scope="module")
def defaults_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("trl_defaults")
    return _make_run(root, DEFAULTS_KW, DEFAULTS_STEPS, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def burnin_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("trl_burnin")
    return _make_run(root, BURNIN_KW, BURNIN_STEPS, tie_word_embeddings=False)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_defaults_bit_exact(defaults_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "bema"
    result = average(
        defaults_run.run_dir, out, schedule=_schedule(DEFAULTS_KW), base_model=defaults_run.base
    )
    assert result.outputs
    assert result.outputs[-1].step == _update_steps(DEFAULTS_KW, defaults_run.max_steps)[-1]
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    _assert_bit_exact(defaults_run.run_dir / "bema", out)
    _assert_moved(defaults_run, out)


def test_burnin_lag_multiplier_clamp_bit_exact(burnin_run: Run, tmp_path: Path) -> None:
    kw = BURNIN_KW
    steps = _update_steps(kw, burnin_run.max_steps)
    assert steps == [5, 8, 11]
    raw = [_raw_beta(kw, t) for t in steps]
    # The clamp must bind for some update steps and not for others, or it is not tested.
    assert any(b < kw["min_ema_multiplier"] for b in raw)
    assert any(b > kw["min_ema_multiplier"] for b in raw)

    out = tmp_path / "bema"
    # update_after > 0: θ0 is checkpoint-τ, no base model needed.
    result = average(burnin_run.run_dir, out, schedule=_schedule(kw))
    assert result.outputs
    assert result.outputs[-1].step == steps[-1]
    _assert_bit_exact(burnin_run.run_dir / "bema", out)
    assert "lm_head.weight" in _load_folder(out)  # untied: averaged as its own tensor
    _assert_moved(burnin_run, out)


def test_cli_bit_exact(defaults_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "bema_cli"
    args = [
        str(defaults_run.run_dir),
        "--output",
        str(out),
        "--base-model",
        str(defaults_run.base),
        "--update-freq",
        str(DEFAULTS_KW["update_freq"]),
        "--quiet",
    ]
    result = CliRunner().invoke(average_command, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    _assert_bit_exact(defaults_run.run_dir / "bema", out)
    _assert_moved(defaults_run, out)


def test_untouched_embedding_rows_bit_exact_at_any_budget(burnin_run: Run, tmp_path: Path) -> None:
    """The vocabulary is larger than the data uses, so (weight_decay 0) the rows of the unused tokens never change
    in the untied input embedding. TRL still replays them, with rounding; the offline replay must too, whatever
    the slicing: a small budget cuts the embedding into slices, some made of untouched rows only."""
    kw = BURNIN_KW
    steps = _update_steps(kw, burnin_run.max_steps)
    folders = [burnin_run.run_dir / f"checkpoint-{s}" for s in [kw["update_after"], *steps]]
    embeddings = [_load_folder(folder)["model.embed_tokens.weight"] for folder in folders]
    rows_untouched = torch.stack([(e == embeddings[0]).all(dim=1) for e in embeddings]).all(dim=0)
    assert 0 < int(rows_untouched.sum()) < len(rows_untouched), "the fixture needs some untouched rows and some trained ones"
    for budget, threads in [("4KiB", 1), ("4KiB", 2), ("64KiB", 2)]:
        out = tmp_path / f"bema-{budget}-{threads}"
        average(burnin_run.run_dir, out, schedule=_schedule(kw), max_memory=budget, threads=threads)
        _assert_bit_exact(burnin_run.run_dir / "bema", out)
