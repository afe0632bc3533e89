"""Sweep specs: grids and sweep files become named methods (`BEMASchedule`s for the schedule-only interface), and
hostile sweep files are refused with one line."""

import json
import os
import re
import time

import pytest

from bema_offline import BEMASchedule, UsageError
from bema_offline.errors import DataError
from bema_offline.methods.registry import make_method
from bema_offline.methods.sweep import (
    MAX_NAME_BYTES,
    MethodOptions,
    check_names,
    config_name,
    grid_configs,
    load_sweep,
    method_configs,
    parse_grid,
    sweep_configs,
)


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


# --- methods in grids and sweep files -------------------------------------------------------------------------------

BASE = MethodOptions(schedule=BEMASchedule(update_freq=100))


def names(configs):
    return [name for name, _ in configs]


def test_a_grid_mixes_methods_and_leaves_out_fields_a_method_does_not_take():
    configs = grid_configs(["method=bema,uniform,wsm", "last=4,8", "decay=cosine"], BASE)
    assert names(configs) == ["bema", "uniform-last4", "uniform-last8", "wsm-cosine-last4", "wsm-cosine-last8"]
    assert dict(configs)["bema"] == make_method("bema", {}, schedule=BASE.schedule)
    assert dict(configs)["wsm-cosine-last8"] == make_method("wsm", {"decay": "cosine", "last": 8})


def test_a_grid_names_schedule_fields_after_the_method():
    configs = grid_configs(["method=bema,dema ema_power=0.3,0.5"], BASE)
    assert names(configs) == ["bema,ema_power=0.3", "bema,ema_power=0.5", "dema,ema_power=0.3", "dema,ema_power=0.5"]
    assert dict(configs)["dema,ema_power=0.5"].schedule == BASE.schedule.replace(ema_power=0.5)


def test_a_grid_inherits_the_command_lines_method_and_options():
    options = MethodOptions("wsm", {"decay": "1-sqrt"})
    assert names(grid_configs(["last=2,4"], options)) == ["wsm-1-sqrt-last2", "wsm-1-sqrt-last4"]
    options = MethodOptions("uniform", {"last": 4}, BEMASchedule(update_freq=100))
    configs = grid_configs(["method=uniform,bema,power-ema", "sigma_rel=0.1"], options)
    assert names(configs) == ["uniform-last4", "bema", "power-ema-sigma0.1"]  # --last follows uniform only


@pytest.mark.parametrize(
    "grid, options, message",
    [
        (["method=bema,dema", "last=4"], BASE, "--grid: last applies to none of the grid's methods (bema, dema)"),
        (["sigma_rel=0.1"], BASE, "--grid: sigma_rel applies to none"),
        (["method=uniform"], MethodOptions("bema", {"sigma_rel": 0.1}), "--sigma-rel applies to none of the configs of --grid (uniform)"),
        (["method=power-ema"], BASE, "power-ema needs --sigma-rel"),
        (["method=mean"], BASE, "unknown method 'mean'"),
        (["last=4,x"], MethodOptions("uniform"), "last must be an integer, got 'x'"),
        ([f"lag={','.join(map(str, range(1, 41)))}", f"ema_power={','.join(str(i / 40) for i in range(40))}"], BASE,
         "--grid: 1600 combinations; one run takes at most 1000 configs"),
    ],
)
def test_grid_errors(grid, options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        grid_configs(grid, options)


def test_a_sweep_file_mixes_methods(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "- name: slow\n  ema_power: 0.3\n"
        "- method: uniform\n  last: 4\n"
        "- {method: power-ema, sigma-rel: 0.1}\n"
        "- {method: ema, half_life: 200}\n"
        "- {method: expo, alpha: 0.3, ref_step: 100}\n"
        "- {method: uniform, window: '100:300'}\n"
        "- {method: dema, ema_power: 0.7}\n"
    )
    configs = sweep_configs(path, BASE)
    assert names(configs) == [
        "slow", "uniform-last4", "power-ema-sigma0.1", "ema-halflife200", "expo-alpha0.3-ref100", "uniform-steps100-300",
        "dema,ema_power=0.7",
    ]
    assert dict(configs)["slow"] == make_method("bema", {"ema_power": 0.3}, schedule=BASE.schedule)
    assert dict(configs)["uniform-steps100-300"].window == (100, 300)


def test_a_sweep_file_refuses_fields_its_methods_do_not_take(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"method": "uniform", "ema_power": 0.3}]))
    with pytest.raises(UsageError, match=r"config 1: ema_power does not apply to uniform; uniform takes --last, --window"):
        sweep_configs(path, BASE)


def test_sweep_files_refuse_repeated_fields_and_too_many_configs(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"method": "power-ema", "sigma-rel": 0.1, "sigma_rel": 0.2}]))
    with pytest.raises(UsageError, match="config 1: a field is given twice"):
        sweep_configs(path)
    path.write_text(json.dumps([{"lag": i} for i in range(1, 1002)]))
    with pytest.raises(DataError, match="1001 configs; one run takes at most 1000"):
        sweep_configs(path)


def test_method_configs_without_a_sweep_is_the_one_method():
    assert method_configs(MethodOptions("uniform", {"last": 2, "window": None})) == [("", make_method("uniform", {"last": 2}))]
    with pytest.raises(UsageError, match="last does not apply to bema"):
        method_configs(MethodOptions("bema", {"last": 2}))
    with pytest.raises(UsageError, match="exclude each other"):
        method_configs(BASE, grid=["lag=1"], sweep="s.yaml")


# --- hostile sweep files (issue 10) --------------------------------------------------------------------------------

# The classic "billion laughs": nine levels of nine aliases each, 9^9 strings once expanded.
BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    + ["slow: {lag: *i}"]
)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"laughs.yaml: line 2 uses a YAML alias \(\*a\); write each value out in full"):
        sweep_configs(path)
    assert time.perf_counter() - started < 1
    path.write_text("base: &base {ema_power: 0.3}\nfast:\n  <<: *base\n  lag: 5\n")  # merge keys are aliases too
    with pytest.raises(DataError, match=r"line 3 uses a YAML alias \(\*base\)"):
        sweep_configs(path)
    path.write_text("fast: &anchor {ema_power: 0.3}\n")  # an anchor alone expands nothing: fine
    assert names(sweep_configs(path)) == ["fast"]


@pytest.mark.parametrize("text", ["- {update_freq: yes}\n", "- {update_freq: on}\n", "- {ema_power: true}\n", "- {last: no, method: uniform}\n"])
def test_a_yaml_bool_is_not_a_number(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=r"must be (an integer|a number), got (True|False)"):
        sweep_configs(path)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("a\x00b", "control character"),
        ("a\nb", "control character"),
        ("model.safetensors", "named like a file of a model folder"),
        ("config.json", "named like a file of a model folder"),
        ("README.md", "named like a file of a model folder"),
        ("readme.MD", "named like a file of a model folder"),
        ("bema_offline.json", "named like a file of a model folder"),
        ("model-00001-of-00002.safetensors", "named like a file of a model folder"),
        ("tokenizer.model", "named like a file of a model folder"),
        ("checkpoint-12", "named like a checkpoint folder"),
        ("x" * (MAX_NAME_BYTES + 1), "too long for a folder name (201 bytes; at most 200)"),
        ("é" * 101, "too long for a folder name (202 bytes"),
        ("a\udcffb", "not valid Unicode"),
        ("../up", "no '/', no leading '.'"),
        (".hidden", "no leading '.'"),
        ("  ", "empty"),
    ],
)
def test_config_names_must_be_plain_folder_names(name, problem):
    with pytest.raises(UsageError, match=re.escape(problem)) as caught:
        check_names([(name, None)], source="--sweep s.yaml")
    assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)


def test_every_file_the_writer_writes_is_a_refused_name():
    from bema_offline.output.card import CARD_FILE, PROVENANCE_FILE
    from bema_offline.output.chart import CHART_SVG
    from bema_offline.output.writer import INDEX_FILE
    from bema_offline.sources.run import SIDECAR_FILES

    for name in (*SIDECAR_FILES, INDEX_FILE, "model.safetensors", CARD_FILE, "effective_weights.png", CHART_SVG, PROVENANCE_FILE):
        with pytest.raises(UsageError):
            check_names([(name, None)], source="s")
    assert check_names([("ema_power=0.5", None), ("uniform-last4", None), ("power-ema-sigma0.05", None)], source="s")


def test_names_from_a_sweep_file_are_checked(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"name": "a\u0000b"}]))
    with pytest.raises(UsageError, match="control character"):
        sweep_configs(path)
    path.write_text(json.dumps({"model.safetensors": {"lag": 3}}))
    with pytest.raises(UsageError, match="named like a file"):
        sweep_configs(path)
    path.write_text(json.dumps([{"name": ["a", "b"]}]))
    with pytest.raises(UsageError, match="name must be text"):
        sweep_configs(path)


def test_sweep_files_must_be_small_regular_files(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="fifo.yaml: the sweep file is not a regular file"):  # and it does not hang
        sweep_configs(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        sweep_configs("/dev/zero")
    with pytest.raises(UsageError, match="not a regular file"):
        sweep_configs(tmp_path)
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(64 << 20)
    with pytest.raises(DataError, match=r"huge.yaml: the sweep file has 67108864 bytes, more than 1048576"):
        sweep_configs(huge)
    (tmp_path / "bad.yaml").write_bytes(b"- {lag: 3}\n\xff\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 11\)"):
        sweep_configs(tmp_path / "bad.yaml")


def test_deep_nesting_is_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="nested too deeply|malformed json"):
        sweep_configs(path)
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(DataError, match="nested too deeply|malformed YAML"):
        sweep_configs(path)


def test_a_window_in_a_sweep_file_is_steps_not_a_base_60_number(tmp_path):
    """YAML 1.1 reads `2:4` as 2·60 + 4 = 124: a window must stay the steps 2 to 4."""
    path = tmp_path / "s.yaml"
    path.write_text("- method: uniform\n  window: 2:4\n- method: uniform\n  window: 8\n")
    configs = sweep_configs(path)
    assert names(configs) == ["uniform-steps2-4", "uniform-last8"] and configs[0][1].window == (2, 4)
    assert configs[0][1].weights([2, 4, 6, 8], base=False) == {2: 0.5, 4: 0.5}
    path.write_text("- method: uniform\n  last: 2\n  last: 3\n")
    with pytest.raises(DataError, match="key 'last' is given twice"):
        sweep_configs(path)
