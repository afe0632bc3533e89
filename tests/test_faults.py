"""The fault hook is inert unless armed, and fires exactly once, at the hit it was armed for."""

import errno

import pytest

from bema_offline import faults


@pytest.fixture(autouse=True)
def disarmed():
    faults.disarm()
    yield
    faults.disarm()


def test_inert_by_default():
    for _ in range(3):
        faults.fault_point("write")
    assert faults.counts() == {}


def test_counts_every_point_passed():
    faults.count_only()
    for point in ("read", "write", "write"):
        faults.fault_point(point)
    assert faults.counts() == {"read": 1, "write": 2}


def test_fires_at_the_armed_hit_only():
    faults.arm("write", 2, "enospc")
    faults.fault_point("write")
    faults.fault_point("read")
    with pytest.raises(OSError) as error:
        faults.fault_point("write")
    assert error.value.errno == errno.ENOSPC
    faults.fault_point("write")  # past the armed hit: nothing


@pytest.mark.parametrize("spec", ["nowhere:1:kill", "write:0:kill", "write:1:explode"])
def test_bad_faults_are_refused(spec):
    point, hit, action = spec.split(":")
    with pytest.raises(ValueError, match="bad fault"):
        faults.arm(point, int(hit), action)


def test_armed_from_the_environment(monkeypatch):
    monkeypatch.setenv(faults.ENV, "read:3:eio")
    faults._arm_from_environment()
    faults.fault_point("read")
    faults.fault_point("read")
    with pytest.raises(OSError) as error:
        faults.fault_point("read")
    assert error.value.errno == errno.EIO


@pytest.mark.parametrize("spec", ["garbage", "write:x:kill", "write:1:explode", "nowhere:1"])
def test_a_malformed_fault_variable_is_one_usage_line_not_a_traceback(spec, tmp_path):
    import subprocess
    import sys

    env = {"BEMA_OFFLINE_FAULT": spec, "PATH": "/usr/bin:/bin"}
    process = subprocess.run(
        [sys.executable, "-m", "bema_offline", "average", str(tmp_path), "-o", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: BEMA_OFFLINE_FAULT=") and "Traceback" not in process.stderr
