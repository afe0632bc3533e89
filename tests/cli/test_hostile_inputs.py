"""Every broken or hostile input of the corpus gets one clean error line, the right exit code, and changes nothing."""

import pytest
from hostile import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input_fails_cleanly(case, tmp_path):
    spec, outcome = run_case(case, tmp_path)
    lines = outcome.stderr.strip().splitlines()
    assert outcome.exit_code == case.exit_code, outcome.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert "Traceback" not in outcome.stderr and "unexpected" not in lines[0]
    for needle in spec.needles:
        assert needle in lines[0], (needle, lines[0])
    assert outcome.stdout == ""
    assert outcome.tree_unchanged, "the inputs were modified or something was written"
    assert outcome.leftovers == []


@pytest.mark.parametrize("case_id", ["nan-in-checkpoint", "malformed-config"])
def test_errors_after_progress_bars_are_still_one_line_last(case_id, tmp_path):
    """Failures during the run, with progress bars on: the error is the last line, and nothing is left."""
    case = next(c for c in CASES if c.id == case_id)
    spec, outcome = run_case(case, tmp_path, quiet=False)
    errors = [line for line in outcome.stderr.splitlines() if "error:" in line]
    assert outcome.exit_code == 1 and len(errors) == 1
    assert outcome.stderr.rstrip().endswith(errors[0]) and "Traceback" not in outcome.stderr
    assert outcome.tree_unchanged and outcome.leftovers == []
