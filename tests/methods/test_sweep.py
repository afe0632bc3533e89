"""Sweep specs: grids and sweep files become named `BEMASchedule`s."""

import pytest

from bema_offline import BEMASchedule, UsageError
from bema_offline.methods.sweep import config_name, load_sweep, parse_grid


def test_grid_is_the_cartesian_product_first_field_slowest():
    configs = parse_grid(["ema_power=0.3,0.5,0.7", "bias_power=0.1,0.2"])
    assert [name for name, _ in configs] == [
        f"ema_power={e},bias_power={b}" for e in ("0.3", "0.5", "0.7") for b in ("0.1", "0.2")
    ]
    assert configs[3][1] == BEMASchedule(ema_power=0.5, bias_power=0.2)


def test_grid_keeps_the_base_schedule_and_types_its_fields():
    base = BEMASchedule(update_freq=100, lag=3)
    configs = parse_grid(["update_after=0,200 convention=trl,paper"], base=base)
    assert [name for name, _ in configs] == [
        "update_after=0,convention=trl", "update_after=0,convention=paper",
        "update_after=200,convention=trl", "update_after=200,convention=paper",
    ]
    assert all(s.update_freq == 100 and s.lag == 3 and isinstance(s.update_after, int) for _, s in configs)


def test_grid_drops_repeated_values_and_refuses_repeated_fields():
    assert len(parse_grid(["lag=10,10.0,20"])) == 2
    with pytest.raises(UsageError, match="given twice"):
        parse_grid(["lag=1", "lag=2"])


def test_config_name():
    assert config_name({"ema_power": 0.3, "update_freq": 400}) == "ema_power=0.3,update_freq=400"


def test_sweep_file_as_a_mapping_of_names(tmp_path):
    path = tmp_path / "s.yml"
    path.write_text("fast: {ema_power: 0.7}\nplain:\nslow:\n  ema_power: 0.3\n  min_ema_multiplier: 1.0e-4\n")
    configs = load_sweep(path, base=BEMASchedule(update_freq=50))
    assert [name for name, _ in configs] == ["fast", "plain", "slow"]
    assert configs[1][1] == BEMASchedule(update_freq=50)
    assert configs[2][1].min_ema_multiplier == 1e-4


def test_unnamed_config_without_fields_is_the_base(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('[{}, {"lag": 5}]')
    assert [name for name, _ in load_sweep(path)] == ["default", "lag=5"]
