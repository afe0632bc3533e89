"""Regenerate the tables of `docs/reliability.md` from what the tool actually does.

It runs the hostile-input corpus (`tests/hostile.py`) and records each message, runs the fault harness
(`tests/faultkit.py`) at every hit of every fault point, runs the hypothesis fuzzers with many examples and counts
them, reads atheris logs if given, and rewrites the parts of `docs/reliability.md` between the
`<!-- generated: NAME -->` and `<!-- end: NAME -->` markers. Nothing else in the file changes.

    PYTHONPATH=. python scripts/reliability_report.py                          # everything (several minutes)
    PYTHONPATH=. python scripts/reliability_report.py --fuzz-examples 2000 --atheris-log header.log index.log
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


SECTIONS = ("faults-overview", "faults", "hostile", "fuzz")


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
    text = replace_section(text, "fuzz", fuzz)
    DOC.write_text(text)
    print(f"wrote {DOC}: hostile failures {hostile_failures}, fuzz exit code {fuzz_code}")
    return 1 if hostile_failures or fuzz_code else 0


if __name__ == "__main__":
    sys.exit(main())
