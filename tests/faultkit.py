"""Attack `bema-average` while it runs: kill it, interrupt it, fill its disk, race a second run against it.

Run as a script, it builds a synthetic run, makes a reference output, and then for each fault it forks a child that
runs the real command line (`bema_offline.cli._run`) with a fault armed through `bema_offline.faults` (the same hook
`BEMA_OFFLINE_FAULT` arms in a normal process). The parent inspects what the child left, runs the next command the
way a user would (plainly, or with `--resume`), and writes one JSON record per fault. Forking from one process that
has imported torch once makes each attempt cost milliseconds instead of an interpreter start.

    python tests/faultkit.py WORKDIR RESULTS.json [--per-point N]   # N hits per point; 0 tries every hit

The parent never checks a claim against the code under test alone: an output counts as complete only if every file
is byte-identical to the reference output (which `verify` recomputed bit for bit), except the `created` time in
`bema_offline.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from synthetic import make_run  # noqa: E402

from bema_offline import faults  # noqa: E402
from bema_offline.cli import _run, average_command  # noqa: E402
from bema_offline.output.verify import verify  # noqa: E402

SIDE_NAMES = ("bema-partial", "bema-lock", "bema-old")
PUBLISH_POINTS = ("lock", "shard-done", "publish", "renamed", "unlock")


@dataclass
class Child:
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    stderr: str
    counts: dict[str, int]


@dataclass
class Scenario:
    name: str
    args: list[str]
    output: Path
    old_output: Path | None = None  # put at `output` before each attempt (an --overwrite run)


@dataclass
class Record:
    scenario: str
    action: str
    point: str
    hit: int
    hits: int
    exit_code: int | None = None
    signal: int | None = None
    message: str = ""
    state: str = ""  # what lies at --output: absent, old, new, or CORRUPT
    left: list[str] = field(default_factory=list)  # leftovers beside --output after the fault
    inputs_unchanged: bool = True
    recovery: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --- running the command in a child --------------------------------------------------------------------------------


def run_child(args: list[str], scratch: Path, *, fault: tuple[str, int, str] | None = None, fsize_limit: int | None = None, stop_ok: bool = False) -> Child | int:
    """Run `bema-average ARGS` in a forked child. With `stop_ok`, return the pid of a child that stopped itself."""
    err_path, counts_path = scratch / "stderr", scratch / "counts.json"
    err_path.unlink(missing_ok=True)
    counts_path.unlink(missing_ok=True)
    # Under a file size limit the child's stderr must be a pipe, which the limit does not cover.
    read_end, write_end = os.pipe() if fsize_limit is not None else (None, None)
    pid = os.fork()
    if pid == 0:  # the child
        code = 99
        try:
            fd = write_end if write_end is not None else os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            if fsize_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
            if fault is None:
                faults.count_only()
            else:
                faults.arm(*fault)
            try:
                _run(average_command, args, prog_name="bema-average")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            if fsize_limit is None:
                counts_path.write_text(json.dumps(faults.counts()))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    if read_end is not None:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            err_path.write_bytes(pipe.read())
    if stop_ok:
        _, status = os.waitpid(pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            return pid
    else:
        _, status = os.waitpid(pid, 0)
    return _finished(status, err_path, counts_path)


def _finished(status: int, err_path: Path, counts_path: Path) -> Child:
    counts = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    if os.WIFSIGNALED(status):
        return Child(None, os.WTERMSIG(status), stderr, counts)
    return Child(os.WEXITSTATUS(status), None, stderr, counts)


# --- looking at what is left ---------------------------------------------------------------------------------------


def snapshot(folder: Path, *, drop_settings: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with `created` (and the settings named in `drop_settings`, which
    must be there) dropped from provenance records."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "bema_offline.json":
                record = json.loads(data)
                record.pop("created", None)
                for name in drop_settings:
                    record["settings"].pop(name)
                data = json.dumps(record, sort_keys=True).encode()
            files[str(path.relative_to(folder))] = data
    return files


def side_files(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.") and p.name.endswith(SIDE_NAMES))


def state_of(output: Path, reference: dict, old: dict | None) -> str:
    if not output.exists():
        return "absent"
    found = snapshot(output)
    if found == reference:
        return "new"
    if old is not None and found == old:
        return "old"
    return "CORRUPT"


def input_fingerprint(run_dir: Path, base_dir: Path) -> dict:
    """The inputs: checkpoint folders and the base model (the output may live inside the run folder)."""
    found = {}
    for root in [base_dir, *sorted(run_dir.glob("checkpoint-*"))]:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                stat = path.stat()
                found[str(path)] = (path.read_bytes(), stat.st_mtime_ns)
    return found


def reset(scenario: Scenario) -> None:
    for name in side_files(scenario.output):
        path = scenario.output.parent / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if scenario.output.exists():
        shutil.rmtree(scenario.output)
    if scenario.old_output is not None:
        shutil.copytree(scenario.old_output, scenario.output)


def pick_hits(count: int, per_point: int) -> list[int]:
    """All hits, or `per_point` of them spread from the first to the last."""
    if per_point <= 0 or count <= per_point:
        return list(range(1, count + 1))
    if per_point == 1:
        return [1]
    return sorted({1 + round(i * (count - 1) / (per_point - 1)) for i in range(per_point)})


# --- the attacks -----------------------------------------------------------------------------------------------


class Harness:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.scratch = workdir / "scratch"
        self.scratch.mkdir(parents=True)
        self.run_dir, self.base_dir, _ = make_run(
            workdir, [1, 2, 3, 4], shards=2, extra={"position_ids": torch.arange(6)}, frozen=("model.norm.weight",)
        )
        common = [str(self.run_dir), "--base-model", str(self.base_dir), "--update-freq", "1", "--save", "ema,bema",
                  "--max-shard-size", "400B", "--max-memory", "4KiB", "-q"]  # fmt: skip
        old = workdir / "old-output"
        self._must_succeed([*common[:4], "2", "-o", str(old), "-q"])  # another model, to be replaced
        self.scenarios = {
            # the default output lies inside the run folder, beside the checkpoints
            "fresh": Scenario("fresh", common, self.run_dir / "bema-offline"),
            "overwrite": Scenario("overwrite", [*common, "-o", str(workdir / "out"), "--overwrite"], workdir / "out", old),
        }
        self.inputs = input_fingerprint(self.run_dir, self.base_dir)
        self.references: dict[str, dict] = {}
        self.counts: dict[str, dict[str, int]] = {}
        for scenario in self.scenarios.values():
            reset(scenario)
            child = self._must_succeed(scenario.args)
            verify(scenario.output, recompute=100, seed=0)  # the reference itself is checked bit for bit
            self.references[scenario.name] = snapshot(scenario.output)
            self.counts[scenario.name] = child.counts
        self.old = snapshot(old)

    def _must_succeed(self, args: list[str]) -> Child:
        child = run_child(args, self.scratch)
        if child.exit_code != 0:
            raise RuntimeError(f"reference run failed: {child.stderr}")
        return child

    def _inspect(self, scenario: Scenario, record: Record, child: Child) -> None:
        record.exit_code, record.signal = child.exit_code, child.signal
        record.message = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""
        record.state = state_of(scenario.output, self.references.get(scenario.name, {}), self.old if scenario.old_output else None)
        record.left = side_files(scenario.output)
        record.inputs_unchanged = input_fingerprint(self.run_dir, self.base_dir) == self.inputs
        if record.state == "CORRUPT":
            record.problems.append("the output is neither absent, the old one, nor the complete new one")
        if not record.inputs_unchanged:
            record.problems.append("the inputs changed")
        if "Traceback" in child.stderr:
            record.problems.append("a traceback was printed")

    def _recover(self, scenario: Scenario, record: Record, *, resume: bool) -> None:
        """Run the command again as a user would, and check that it ends with the complete new output."""
        args = [*scenario.args, *(["--resume"] if resume else [])]
        args = [a for a in args if a != "-q"]
        os.environ["TQDM_DISABLE"] = "1"
        child = run_child(args, self.scratch)
        state = state_of(scenario.output, self.references[scenario.name], None)
        reused = next((int(line.split("reused ")[1].split()[0]) for line in child.stderr.splitlines() if "reused " in line), 0)
        result = {"resume": resume, "exit_code": child.exit_code, "state": state, "reused_shards": reused,
                  "left": side_files(scenario.output), "message": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""}  # fmt: skip
        record.recovery.append(result)
        refused = child.exit_code == 2 and "already exists" in child.stderr
        if state != "new":
            record.problems.append(f"recovery {'--resume' if resume else 'run'} did not end with the new output ({state})")
        if refused:
            if any(name not in result["message"] for name in result["left"]):
                record.problems.append("the refusal does not name the leftovers it leaves")
        elif child.exit_code != 0 or result["left"]:
            record.problems.append(f"recovery failed or left {result['left']}: {result['message']}")

    def kill(self, scenario: Scenario, point: str, hit: int, hits: int, *, resume_ways: list[bool]) -> Record:
        """SIGKILL at one point, then recover from the same leftovers, with `--resume` and/or without."""
        record = Record(scenario.name, "SIGKILL", point, hit, hits)
        reset(scenario)
        child = run_child(scenario.args, self.scratch, fault=(point, hit, "kill"))
        self._inspect(scenario, record, child)
        if child.signal != signal.SIGKILL:
            record.problems.append(f"the fault did not fire (exit {child.exit_code})")
        saved = self.scratch / "saved"
        shutil.rmtree(saved, ignore_errors=True)
        saved.mkdir()
        for name in [*record.left, *([scenario.output.name] if scenario.output.exists() else [])]:
            source = scenario.output.parent / name
            shutil.copytree(source, saved / name, symlinks=True) if source.is_dir() else shutil.copy2(source, saved / name)
        for resume in resume_ways:
            for name in side_files(scenario.output):
                path = scenario.output.parent / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if scenario.output.exists():
                shutil.rmtree(scenario.output)
            for path in saved.iterdir():
                target = scenario.output.parent / path.name
                shutil.copytree(path, target, symlinks=True) if path.is_dir() else shutil.copy2(path, target)
            self._recover(scenario, record, resume=resume)
        return record

    def interrupt(self, scenario: Scenario, point: str, hit: int, hits: int) -> Record:
        """SIGINT (Ctrl-C) at one point: exit 130 and nothing left, or, once publishing began, a finished run."""
        record = Record(scenario.name, "SIGINT", point, hit, hits)
        reset(scenario)
        child = run_child(scenario.args, self.scratch, fault=(point, hit, "int"))
        self._inspect(scenario, record, child)
        published = point in ("publish", "renamed", "unlock")
        if published:
            if child.exit_code != 0 or record.state != "new":
                record.problems.append("a Ctrl-C while publishing did not let the run finish")
        elif child.exit_code != 130 or record.message != "interrupted; nothing was written":
            record.problems.append(f"expected exit 130 and the interrupted message, got {child.exit_code}: {record.message}")
        elif record.state != ("old" if scenario.old_output else "absent"):
            record.problems.append(f"the output is {record.state} after a Ctrl-C")
        if record.left:
            record.problems.append(f"a Ctrl-C left {record.left}")
        return record

    def io_error(self, scenario: Scenario, point: str, hit: int, hits: int, action: str) -> Record:
        """An OSError (ENOSPC or EIO) at one point: exit 1 with one error line, output untouched, nothing left."""
        record = Record(scenario.name, action.upper(), point, hit, hits)
        reset(scenario)
        child = run_child(scenario.args, self.scratch, fault=(point, hit, action))
        self._inspect(scenario, record, child)
        words = "No space left on device" if action == "enospc" else "Input/output error"
        lines = child.stderr.strip().splitlines()
        if child.exit_code != 1 or len(lines) != 1 or not lines[0].startswith("error: ") or words not in lines[0]:
            record.problems.append(f"expected exit 1 and one error line naming the error, got {child.exit_code}: {child.stderr!r}")
        if record.state != ("old" if scenario.old_output else "absent"):
            record.problems.append(f"the output is {record.state} after a write failure")
        if record.left:
            record.problems.append(f"a write failure left {record.left}")
        return record

    def file_size_limit(self, scenario: Scenario, limit: int) -> Record:
        """A real write failure: RLIMIT_FSIZE makes the kernel refuse to grow any file past `limit` bytes (EFBIG)."""
        record = Record(scenario.name, "RLIMIT_FSIZE", f"{limit} bytes", 1, 1)
        reset(scenario)
        child = run_child(scenario.args, self.scratch, fsize_limit=limit)
        self._inspect(scenario, record, child)
        lines = child.stderr.strip().splitlines()
        if child.exit_code != 1 or len(lines) != 1 or "File too large" not in lines[0] or "free some disk space" not in lines[0]:
            record.problems.append(f"expected one error line about the file size, got {child.exit_code}: {child.stderr!r}")
        if record.state != ("old" if scenario.old_output else "absent") or record.left:
            record.problems.append(f"the output is {record.state} and {record.left} were left")
        return record

    def full_disk(self, size: str) -> Record | None:
        """A real full disk: the output on a tmpfs of `size`; None where mounting is not allowed."""
        mount = self.workdir / "tmpfs"
        mount.mkdir(exist_ok=True)
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode == 0
        except OSError:  # no mount command
            mounted = False
        if not mounted:
            mount.rmdir()
            return None
        try:
            scenario = Scenario("tmpfs", [*self.scenarios["fresh"].args, "-o", str(mount / "out")], mount / "out")
            record = Record(scenario.name, "ENOSPC (tmpfs)", f"size={size}", 1, 1)
            child = run_child(scenario.args, self.scratch)
            self._inspect(scenario, record, child)
            lines = child.stderr.strip().splitlines()
            if child.exit_code != 1 or len(lines) != 1 or "No space left on device" not in lines[0]:
                record.problems.append(f"expected one error line about the full disk, got {child.exit_code}: {child.stderr!r}")
            if record.state != "absent" or record.left or os.listdir(mount):
                record.problems.append(f"the full disk holds {os.listdir(mount)}")
            return record
        finally:
            subprocess.run(["umount", str(mount)], check=True)
            mount.rmdir()

    def second_run(self, scenario: Scenario, point: str, hit: int, hits: int) -> Record:
        """Stop a run at one point, start a second on the same output (plain and --overwrite), then let the first finish."""
        record = Record(scenario.name, "second run", point, hit, hits)
        reset(scenario)
        first = run_child(scenario.args, self.scratch / "first", fault=(point, hit, "stop"), stop_ok=True)
        if not isinstance(first, int):
            record.problems.append(f"the first run did not stop at {point} #{hit}")
            return record
        staging = scenario.output.parent / f".{scenario.output.name}.bema-partial"
        before = snapshot(staging) if staging.exists() else None
        for extra in ([], ["--overwrite"]):
            second = run_child([*scenario.args, *extra], self.scratch)
            message = second.stderr.strip().splitlines()[-1] if second.stderr.strip() else ""
            record.recovery.append({"second_args": extra, "exit_code": second.exit_code, "message": message})
            refused = second.exit_code == 2 and (f"another bema-offline run (pid {first})" in message or "already exists" in message)
            if not refused:
                record.problems.append(f"the second run was not refused: {second.exit_code} {message}")
        if before is not None and (not staging.exists() or snapshot(staging) != before):
            record.problems.append("the second run touched the first run's staging folder")
        os.kill(first, signal.SIGCONT)
        _, status = os.waitpid(first, 0)
        child = _finished(status, self.scratch / "first" / "stderr", self.scratch / "first" / "counts.json")
        self._inspect(scenario, record, child)
        if child.exit_code != 0 or record.state != "new" or record.left:
            record.problems.append(f"the first run did not finish cleanly: {child.exit_code} {record.state} {record.left}")
        return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--per-point", type=int, default=3, help="hits tried per fault point (0: every hit)")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)  # no thread pool in the parent, so that forked children are safe
    started = time.perf_counter()
    harness = Harness(options.workdir)
    (harness.scratch / "first").mkdir()
    records: list[Record] = []
    quick = options.per_point > 0  # CI: recover one way or the other, alternately; by hand: both ways every time
    for name, scenario in harness.scenarios.items():
        counts = harness.counts[name]
        for number, point in enumerate(faults.POINTS):
            if quick and name == "overwrite" and point not in PUBLISH_POINTS:
                continue  # an old output only matters once publishing starts
            hits = counts.get(point, 0)
            chosen = pick_hits(hits, options.per_point)
            if quick and point == "shard-done":  # the last shard recorded: a resume must reuse them all, whatever the timing
                chosen = sorted({*chosen, hits})
            for hit in chosen:
                ways = [(number + hit) % 2 == 0 or (point == "shard-done" and hit == hits)] if quick else [True, False]
                records.append(harness.kill(scenario, point, hit, hits, resume_ways=ways))
                records.append(harness.interrupt(scenario, point, hit, hits))
    fresh, counts = harness.scenarios["fresh"], harness.counts["fresh"]
    io_points = ("staging", "read", "write", "shard-created", "shard-done", "index", "sidecars", "publish")
    for number, point in enumerate(io_points):
        for action in [("enospc", "eio")[number % 2]] if quick else ["enospc", "eio"]:
            for hit in pick_hits(counts.get(point, 0), options.per_point):
                records.append(harness.io_error(fresh, point, hit, counts[point], action))
    for limit in (0, 100, 500, 1500):
        records.append(harness.file_size_limit(fresh, limit))
    disks = [harness.full_disk(f"{kib}k") for kib in ((8, 24, 48) if quick else range(8, 72, 4))]
    records += [disk for disk in disks if disk is not None]
    for point in ("lock", "write", "shard-done", "sidecars", "publish", "renamed"):
        for hit in pick_hits(counts.get(point, 0), 1):
            records.append(harness.second_run(fresh, point, hit, counts[point]))
    summary = {
        "seconds": round(time.perf_counter() - started, 1),
        "hits_per_point": harness.counts,
        "tmpfs": any(disk is not None for disk in disks),
        "records": [asdict(r) for r in records],
    }
    options.results.write_text(json.dumps(summary, indent=1))
    return 1 if any(r.problems for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
