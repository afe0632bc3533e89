"""`bema_offline.train.rounds_plan`: each round's averaging method checked against the checkpoints the rounds will
save before anything trains, and what `rounds.json` keeps of the plan, compared option by option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bema_offline import BEMASchedule
from bema_offline.errors import UsageError
from bema_offline.methods.expo import ExPO
from bema_offline.methods.posthoc import PowerEMA
from bema_offline.methods.replay import BEMA, EMA
from bema_offline.methods.windows import Uniform
from bema_offline.train.rounds_plan import REFERENCES, IteratePlan, plan_differences, plan_record, upgraded_plan_record


def plan(**changes) -> IteratePlan:
    settings = dict(base_model=Path("base"), datasets=(Path("prefs.jsonl"),), rounds=2, workdir=Path("work"), save_steps=2, max_steps=4)
    return IteratePlan(**{**settings, **changes})


def test_every_method_of_bema_average_is_a_reference() -> None:
    assert REFERENCES == ("bema", "ema", "last", "base", "dema", "ouema", "uniform", "power-ema", "wsm", "expo")
    assert plan().average_method == BEMA(BEMASchedule(update_freq=2))  # the default: TRL's, on the save grid
    assert plan(reference="ema").average_method == EMA(BEMASchedule(update_freq=2))
    assert plan(reference="base").average_method == plan(reference="last").average_method == plan().average_method
    assert plan(reference="uniform").average_method == Uniform()  # every checkpoint of the round
    assert plan(max_steps=5).expected_steps() == [2, 4, 5] and plan(max_steps=None).expected_steps() is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(reference="power-ema"), "--reference power-ema: power-ema needs --sigma-rel"),
        (dict(reference="uniform", method=BEMA()), "--reference uniform takes its own method's average, but the method given is bema"),
        (dict(method=BEMA(BEMASchedule(update_freq=3))), "--update-freq 3: the update steps must be saved checkpoints, and each round saves one every --save-steps 2 steps; use a multiple of 2"),
        (dict(method=BEMA(BEMASchedule(update_freq=2, update_after=1))), "--update-after 1: θ0 would be checkpoint-1, which no round saves"),
        (dict(reference="expo", method=ExPO(alpha=0.5, ref_step=3)), "--ref-step 3: no round saves checkpoint-3 (one every --save-steps 2 steps)"),
        (dict(reference="expo", method=ExPO(alpha=0.5, ref_step=4)), "expo: ref_step 4 is the last checkpoint itself"),
        (dict(reference="uniform", method=Uniform(last=3)), "--reference uniform: each round saves checkpoints 2, 4 (--save-steps 2, --max-steps 4), and uniform: last 3 checkpoints asked for, but there are 2"),
        (dict(reference="uniform", method=Uniform(window=(5, None))), "uniform: window 5: holds no checkpoint"),
        (dict(reference="bema", method=BEMA(BEMASchedule(update_freq=4)), max_steps=3), "no checkpoint"),
    ],
)
def test_an_average_the_rounds_cannot_give_is_refused_before_training(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        plan(**changes).check()


@pytest.mark.parametrize(
    "changes",
    [
        dict(reference="expo", method=ExPO(alpha=0.5, ref_step=2), max_steps=5),  # checkpoints 2, 4 and 5 (the last step)
        dict(reference="uniform", method=Uniform(last=50), max_steps=None),  # how many checkpoints is not known yet
        dict(method=BEMA(BEMASchedule(update_freq=4, update_after=2)), max_steps=8),
        dict(reference="power-ema", method=PowerEMA(sigma_rel=0.2)),
    ],
)
def test_averages_the_rounds_can_give_pass(changes: dict) -> None:
    plan(**changes).check()


def record_of(**changes) -> dict:
    """A plan record without TRL's resolution of DPOConfig (the fields compared here are the method's)."""
    built = plan(**changes)
    return {"reference": built.reference, "policy_init": built.policy_start, "average": built.average_method.to_dict()}


def test_a_changed_method_is_named_once() -> None:
    uniform = record_of(reference="uniform", method=Uniform(last=2))
    assert plan_differences(uniform, record_of(reference="uniform", method=Uniform(last=1))) == ["--last was 2, now 1"]
    assert plan_differences(uniform, record_of(reference="uniform", method=Uniform(window=(2, None)))) == [
        "--last was 2, now not set", "--window was not set, now 2:"
    ]
    # another reference: one line, not one per parameter of either method
    assert plan_differences(uniform, record_of()) == ["--reference was uniform, now bema"]
    bema = record_of(method=BEMA(BEMASchedule(update_freq=2, ema_power=0.3)))
    assert plan_differences(record_of(), bema) == ["--ema-power was 0.5, now 0.3"]
    assert plan_differences(record_of(reference="base"), record_of(reference="base", method=PowerEMA(sigma_rel=0.1))) == [
        "the average's method was bema, now power-ema"
    ]


def test_the_first_rounds_json_files_are_read_as_the_same_plan() -> None:
    """Before every method could be a reference, the plan held the kind and the schedule apart."""
    current = plan_record(plan(config_overrides={"use_cpu": True, "gradient_checkpointing": False}), "f" * 64)
    first = {key: value for key, value in current.items() if key != "average"}
    first.update(average="bema", schedule=BEMASchedule(update_freq=2).to_dict())
    assert upgraded_plan_record(first) == current and plan_differences(first, current) == []
    assert plan_differences({**first, "schedule": {**first["schedule"], "lag": 5}}, current) == ["--lag was 5, now 10"]


def test_what_the_plan_keeps_of_a_lora_config() -> None:
    """r, lora_alpha, lora_dropout and target_modules always; any other field only where it differs from peft's
    default, so that giving a default is the same plan; each difference named by its option."""
    from bema_offline.train.dpo import lora_config

    assert plan_record(plan(), "f" * 64)["lora"] is None
    record = plan_record(plan(lora=lora_config(r=16, target_modules="v_proj,q_proj", pairs=["use_rslora=true", "bias=none"])), "f" * 64)["lora"]
    assert record == {"r": 16, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "use_rslora": True}
    default = plan_record(plan(lora=lora_config(r=16)), "f" * 64)["lora"]
    assert default == {"r": 16, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None}
    rank = plan_record(plan(lora=lora_config(r=16, pairs=['rank_pattern={"v_proj": 2}'])), "f" * 64)["lora"]
    assert rank["rank_pattern"] == {"v_proj": 2}
    assert plan_differences({"lora": record}, {"lora": default}) == [
        "--lora-target-modules was ['q_proj', 'v_proj'], now not set", "--lora-set use_rslora was True, now not set"
    ]
    assert plan_differences({"lora": default}, {"lora": rank}) == ["--lora-set rank_pattern was not set, now {'v_proj': 2}"]
    assert plan_differences({"lora": None}, {"lora": default})[0] == "--lora-alpha was not set, now 8"
