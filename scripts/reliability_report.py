"""Regenerate the tables of `docs/reliability.md` from what the tool actually does.

It runs the hostile-input corpus (`tests/hostile.py`) and records each message, runs the fault harness
(`tests/faultkit.py`) at every hit of every fault point, runs the hypothesis fuzzers with many examples and counts
them, runs the tests of each class of issue 10 (`ROUND_2`) and counts their outcomes, reads atheris logs if given,
and rewrites the parts of `docs/reliability.md` between the `<!-- generated: NAME -->` and `<!-- end: NAME -->`
markers. Nothing else in the file changes.

    PYTHONPATH=. python scripts/reliability_report.py                          # everything (several minutes)
    PYTHONPATH=. python scripts/reliability_report.py --fuzz-examples 2000 --atheris-log header.log index.log

Without `--atheris-log`, the atheris table already in the document is kept.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DOC = REPO / "docs" / "reliability.md"


def hostile_table() -> tuple[str, int]:
    from hostile import CASES, run_case

    rows = ["| case | broken input | exit | message (paths shortened to `…`) | nothing written, inputs unchanged |", "|---|---|---|---|---|"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            root = Path(tmp) / case.id
            root.mkdir()
            spec, outcome = run_case(case, root)
            lines = outcome.stderr.strip().splitlines()
            clean = (
                outcome.exit_code == case.exit_code and len(lines) == 1 and lines[0].startswith("error: ")
                and all(n in lines[0] for n in spec.needles) and outcome.tree_unchanged and not outcome.leftovers
            )  # fmt: skip
            failures += not clean
            message = (lines[-1] if lines else "").replace(str(root), "…").replace("|", "\\|")
            kept = "yes" if outcome.tree_unchanged and not outcome.leftovers else "**NO**"
            rows.append(f"| `{case.id}` | {case.what} | {outcome.exit_code} | `{message}` | {kept} |")
    return "\n".join(rows), failures


def fault_tables(per_point: int) -> tuple[str, str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.json"
        subprocess.run([sys.executable, str(REPO / "tests" / "faultkit.py"), str(Path(tmp) / "work"), str(results), "--per-point", str(per_point)], env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        summary = json.loads(results.read_text())
    groups: dict[tuple, list] = collections.defaultdict(list)
    for record in summary["records"]:
        groups[(record["action"], record["scenario"], record["point"])].append(record)
    rows = [
        "| fault | scenario | point | hits in a run | tried | --output afterwards | next run | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (action, scenario, point), records in groups.items():
        states = collections.Counter(r["state"] for r in records)
        recoveries = [x for r in records for x in r["recovery"]]
        reused = sum(x.get("reused_shards", 0) for x in recoveries)
        if action == "SIGKILL":
            resumed = sum(1 for x in recoveries if x.get("resume"))
            refused = sum(1 for x in recoveries if x.get("exit_code") == 2)
            following = f"{len(recoveries)} runs ({resumed} with --resume, {reused} shards reused; {refused} refused: output already complete)"
        elif action == "second run":
            following = f"{len(recoveries)} second runs refused; the first finished"
        else:
            following = "—"
        problems = sum(len(r["problems"]) for r in records)
        lost = "nothing" if problems == 0 else f"**{problems} problems**"
        hits = records[0]["hits"] if action in ("SIGKILL", "SIGINT", "ENOSPC", "EIO", "second run") else "—"
        shown = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
        rows.append(f"| {action} | {scenario} | {point} | {hits} | {len(records)} | {shown} | {following} | {lost} |")
    totals = collections.Counter(r["action"] for r in summary["records"])
    total_problems = sum(len(r["problems"]) for r in summary["records"])
    overview = "\n".join(
        [
            "| fault | attempts |",
            "|---|---|",
            *[f"| {action} | {count} |" for action, count in totals.items()],
            f"| **all** | **{len(summary['records'])}** (problems: {total_problems}; {summary['seconds']} s) |",
        ]
    )
    return overview, "\n".join(rows), summary


def hypothesis_counts(examples: int) -> tuple[str, int]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_fuzz_parsers.py"), "--hypothesis-show-statistics"]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "BEMA_FUZZ_EXAMPLES": str(examples), "PYTHONPATH": str(REPO)}, cwd=REPO)  # fmt: skip
    rows = ["| fuzzer (hypothesis, derandomized) | inputs tried | failing | outcome |", "|---|---|---|---|"]
    for name, body in re.findall(r"test_fuzz_parsers\.py::(\w+):\n(.*?)(?=\ntests/|\n=|\Z)", process.stdout, re.S):
        passing = sum(int(n) for n in re.findall(r"(\d+) passing", body))
        failing = sum(int(n) for n in re.findall(r"(\d+) failing", body))
        outcome = "a result that keeps the parser's promises, or a `DataError`" if failing == 0 else "**failures**"
        rows.append(f"| `{name}` | {passing} | {failing} | {outcome} |")
    return "\n".join(rows), process.returncode


def atheris_counts(logs: list[Path]) -> str:
    rows = ["| fuzzer (atheris / libFuzzer, coverage-guided) | inputs tried | seconds | findings |", "|---|---|---|---|"]
    for log in logs:
        text = log.read_text(errors="replace")
        done = re.findall(r"Done (\d+) runs in (\d+) second", text)
        runs, seconds = done[-1] if done else ("?", "?")
        findings = "none" if "ERROR:" not in text and "crash-" not in text else "**see log**"
        rows.append(f"| `scripts/fuzz_atheris.py {log.stem.split('-')[-1]}` | {runs} | {seconds} | {findings} |")
    return "\n".join(rows)


# Issue 10 ("trust, second round"): each class it names, and the tests that prove its repair (pytest node ids; a test
# id without parameters stands for all of them). `docs/reliability.md` describes each mechanism.
HOSTILE = "tests/cli/test_hostile_inputs.py::test_hostile_input_fails_cleanly"
ROUND_2 = [
    ("frozen tensors decided per slice, with `==`", [
        "tests/engine/test_frozen.py",
        "tests/test_trl_parity.py::test_untouched_embedding_rows_bit_exact_at_any_budget",
    ]),
    ("a checkpoint with model.safetensors and shards plus an index", [
        "tests/output/test_verify.py::test_both_single_file_and_index",
        "tests/sources/test_run.py::test_a_folder_with_both_model_safetensors_and_shards_is_read_as_transformers_loads_it",
    ]),
    ("a checkpoint rewritten in place during a run", [
        "tests/test_files.py::test_open_files_refuses_a_file_replaced_since_it_was_planned",
        "tests/test_files.py::test_a_checkpoint_rewritten_in_place_during_the_run_is_refused",
    ]),
    ("float8 outputs saturating silently", ["tests/engine/test_output_range.py"]),
    ("an output that nothing can open (shape overflow, lone surrogate)", [
        f"{HOSTILE}[header-lone-surrogate]", f"{HOSTILE}[header-shape-overflow]",
    ]),
    ("the lock file following links", [
        f"{HOSTILE}[lock-is-a-link]", f"{HOSTILE}[lock-is-a-hard-link]",
        "tests/output/test_publish.py::test_a_stale_lock_of_a_killed_run_is_removed_by_name",
        "tests/output/test_publish.py::test_a_lock_name_that_is_not_a_lock_file_is_refused_and_left_alone",
    ]),
    ("--output inside the run, named like a checkpoint", [
        f"{HOSTILE}[output-named-like-a-checkpoint]", f"{HOSTILE}[output-is-an-ignored-checkpoint]",
        "tests/output/test_publish.py::test_check_output_refuses_outputs_named_like_checkpoints",
    ]),
    ("inputs that are links into the output", [
        f"{HOSTILE}[input-symlinked-into-output]", f"{HOSTILE}[input-hard-linked-into-output]",
    ]),
    ("every path opened for writing (no link followed, nothing truncated)", [
        "tests/test_files.py::test_create_new_file_never_follows_a_link_nor_truncates",
        "tests/output/test_writer.py::test_a_link_left_where_a_sidecar_goes_is_replaced_not_written_through",
        "tests/output/test_resume.py::test_links_planted_in_a_resumed_staging_folder_are_never_written_through",
    ]),
    ("side files that are FIFOs, devices or huge", [
        "tests/test_files.py::test_a_fifo_is_refused_without_blocking",
        "tests/test_files.py::test_devices_folders_and_huge_files_are_refused",
        "tests/sources/test_run.py::test_side_files_that_are_fifos_or_devices_never_hang_a_run",
    ]),
    ("a sweep YAML 'billion laughs'", [
        "tests/methods/test_sweep.py::test_yaml_aliases_are_refused_before_they_expand",
        "tests/test_fuzz_parsers.py::test_random_yaml_text", "tests/test_fuzz_parsers.py::test_random_sweep_files",
    ]),
    ("a stray checkpoint-1000000000000", ["tests/engine/test_plan.py::test_a_stray_far_checkpoint_costs_nothing"]),
    ("checks quadratic in tensors × shards", ["tests/output/test_verify.py::test_every_check_is_linear_in_tensors_and_shards"]),
    ("inputs that got a traceback or a wrong exit code", [
        "tests/cli/test_average.py::test_invalid_parameters",
        "tests/cli/test_average.py::test_a_path_that_is_not_utf8_gets_a_card_and_verifies",
        "tests/engine/test_plan.py::test_a_schedule_whose_factors_overflow_is_a_usage_error",
        "tests/methods/test_sweep.py::test_config_names_must_be_plain_folder_names",
        "tests/methods/test_sweep.py::test_every_file_the_writer_writes_is_a_refused_name",
        "tests/methods/test_sweep.py::test_a_yaml_bool_is_not_a_number",
        "tests/test_faults.py::test_a_malformed_fault_variable_is_one_usage_line_not_a_traceback",
        "tests/output/test_writer.py::test_a_sidecar_that_disappeared_since_planning_is_refused",
    ]),
    ("absolute local paths pushed to the Hub", [
        "tests/output/test_hub.py::test_what_goes_up_names_no_local_path_and_the_output_is_untouched",
        "tests/output/test_hub.py::test_local_paths_in_any_string_are_redacted",
        "tests/output/test_hub.py::test_a_selected_output_goes_up_without_the_paths_of_its_leaderboard",
        "tests/output/test_hub.py::test_files_are_copied_where_they_cannot_be_linked",
        "tests/output/test_hub.py::test_a_failed_upload_leaves_the_output_as_it_was",
        "tests/output/test_hub.py::test_a_copy_downloaded_from_the_hub_verifies_its_files_but_names_no_sources",
        "tests/cli/test_push.py::test_push_command",
    ]),
    ("no content hashes (a flipped bit seen only by --recompute)", [
        "tests/output/test_writer.py::test_shard_sha256_is_right_whatever_the_order_and_the_threads",
        "tests/output/test_writer.py::test_in_file_order_nothing_is_read_back_and_in_reverse_all_but_the_first_piece",
        "tests/output/test_writer.py::test_an_average_records_the_sha256_of_every_weight_file",
        "tests/output/test_verify.py::test_plain_verify_catches_one_wrong_bit_by_its_sha256",
        "tests/output/test_verify.py::test_plain_verify_catches_a_header_edit_that_every_structural_check_accepts",
        "tests/output/test_verify.py::test_values_are_read_once_in_file_order_for_the_sha256_and_every_float_is_checked",
        "tests/output/test_verify.py::test_an_output_of_an_older_version_without_file_records_gets_a_note",
    ]),
]


def round_2_table() -> tuple[str, int]:
    """Run the tests of each class of issue 10 in one pytest process and count their outcomes per class."""
    ids = [test for _, tests in ROUND_2 for test in tests]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *ids]
        subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        cases = ElementTree.parse(report).getroot().iter("testcase")
        outcomes = {}
        for case in cases:  # classname "tests.engine.test_frozen", name "test_x[param]"
            node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
            failed = any(child.tag in ("failure", "error") for child in case)
            skipped = any(child.tag == "skipped" for child in case)
            outcomes[node] = "failed" if failed else "skipped" if skipped else "passed"
    rows = ["| class (issue 10) | tests | passed | failed | skipped |", "|---|---|---|---|---|"]
    failures = 0
    for title, tests in ROUND_2:
        mine = [outcome for node, outcome in outcomes.items() if any(_selects(test, node) for test in tests)]
        counts = collections.Counter(mine)
        failures += counts["failed"] + (not mine)
        rows.append(f"| {title} | {len(mine)} | {counts['passed']} | {counts['failed']} | {counts['skipped']} |")
    total = collections.Counter(outcomes.values())
    rows.append(f"| **all** | **{len(outcomes)}** | **{total['passed']}** | **{total['failed']}** | **{total['skipped']}** |")
    return "\n".join(rows), failures


def _selects(test: str, node: str) -> bool:
    """Whether the pytest id `test` (a file, a test, or a parametrized test) selects the collected test `node`."""
    return node == test or node.startswith(test + "[") or node.startswith(test + "::")


SECTIONS = ("faults-overview", "faults", "hostile", "fuzz", "round-2")


def _atheris_table(text: str) -> str | None:
    """The atheris table already in the fuzz section of the document, if any."""
    match = re.search(r"^\| fuzzer \(atheris.*?(?=\n\n|\n<!-- end)", text, re.S | re.M)
    return match.group(0) if match else None


def _section(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)


def replace_section(text: str, name: str, content: str) -> str:
    return _section(name).sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-point", type=int, default=0, help="hits tried per fault point (0: all)")
    parser.add_argument("--fuzz-examples", type=int, default=2000, help="hypothesis examples per fuzzer")
    parser.add_argument("--atheris-log", type=Path, nargs="*", default=[], help="logs of scripts/fuzz_atheris.py runs")
    options = parser.parse_args()
    text = DOC.read_text()
    missing = [name for name in SECTIONS if not _section(name).search(text)]
    if missing:
        raise SystemExit(f"{DOC}: no <!-- generated: {missing[0]} --> ... <!-- end: {missing[0]} --> section")
    hostile, hostile_failures = hostile_table()
    text = replace_section(text, "hostile", hostile)
    overview, faults_detail, _ = fault_tables(options.per_point)
    text = replace_section(text, "faults-overview", overview)
    text = replace_section(text, "faults", faults_detail)
    fuzz, fuzz_code = hypothesis_counts(options.fuzz_examples)
    if options.atheris_log:
        fuzz += "\n\n" + atheris_counts(options.atheris_log)
    elif kept := _atheris_table(text):  # without new logs, the last atheris run's table stays
        fuzz += "\n\n" + kept
    text = replace_section(text, "fuzz", fuzz)
    round_2, round_2_failures = round_2_table()
    text = replace_section(text, "round-2", round_2)
    DOC.write_text(text)
    print(f"wrote {DOC}: hostile failures {hostile_failures}, fuzz exit code {fuzz_code}, issue 10 failures {round_2_failures}")
    return 1 if hostile_failures or fuzz_code or round_2_failures else 0


if __name__ == "__main__":
    sys.exit(main())
