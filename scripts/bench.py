"""Benchmarks of `bema-average` on synthetic runs: wall time, peak RSS and throughput of whole processes.

Each case runs as its own process, started from this light launcher (no torch here, so the child's peak RSS is
its own), and is timed `--repeat` times with a warm page cache (the inputs are read once before each case).
Side by side: a raw read of the same bytes (`cat`, the floor), the naive load-everything baseline
(`scripts/naive_baseline.py`), the previous version of the engine (`git archive` of `--previous`), the current
one, K separate runs against one sweep of K configs, and how time and memory grow with checkpoint count, model
size and `--max-memory`.

Sections can be run one at a time (each in a few minutes); results accumulate in `docs/benchmarks.json`, and
`docs/benchmarks.md` and `docs/benchmarks.png` are rewritten from all of them after each call:

    python scripts/bench.py main sweep budget count linearity layouts --repeat 3
    python scripts/bench.py lora --repeat 3   # a LoRA run (issue 11): 1 GiB bf16 base, 8 adapters of r = 16
    python scripts/bench.py hash --repeat 8 --previous 325d8fb   # the cost of the content hashes (A/B, in turns)
    python scripts/bench.py many-tensors --repeat 3               # 20,000 small tensors against a few large ones
    python scripts/bench.py report            # only rewrite the Markdown and the plot

Synthetic runs are generated under `--root` (default /tmp/bema-bench) on first use and reused; delete it when done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
GIB = 2**30
SECTIONS = ("main", "sweep", "methods", "budget", "groups", "count", "linearity", "cold", "layouts", "stepwise", "lora", "hash", "many-tensors")
SWEEP_GRID = ["ema_power=0.3,0.4,0.5,0.6", "bias_power=0.1,0.2"]  # 8 configs
# 8 configs of 8 methods (a field a method does not take is left out of its config)
METHODS_GRID = ["method=bema,ema,dema,ouema,uniform,power-ema,wsm,expo", "last=4", "sigma_rel=0.1", "decay=cosine", "alpha=0.3"]


# --- measuring --------------------------------------------------------------------------------------------------


def measure(command: list[str], *, env: dict | None = None) -> tuple[float, int, str, int | None]:
    """Run a command; return (wall seconds, peak RSS in bytes of the child as the kernel counts it, its stdout, the
    bytes it read through read syscalls, pread included: `rchar` of /proc/self/io, to which a reaped child's adds)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        to = subprocess.DEVNULL if command[0] == "cat" else out  # cat's output is the input bytes themselves
        read_before = bytes_read()
        process = subprocess.Popen(command, env=env, stdout=to, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        read_after = bytes_read()
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{stderr[-2000:]}")
    read = read_after - read_before if read_before is not None and read_after is not None else None
    return wall, usage.ru_maxrss * 1024, stdout, read


def bytes_read() -> int | None:
    """This process's `rchar` (bytes read by syscalls, its reaped children's included), or None off Linux."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith("rchar:")), None)


# the time a tool reports for itself, once its imports are done: `bema-average`'s summary line and
# the naive baseline's last line
_INPROCESS = re.compile(r"(?:sources in|computed in) ([0-9.]+) s\s*$")


def inprocess_seconds(stdout: str) -> float | None:
    match = _INPROCESS.search(stdout.strip())
    return float(match.group(1)) if match else None


def warm(files: list[Path]) -> None:
    """Read the files once, so that they are in the page cache."""
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (POSIX_FADV_DONTNEED), so that the next read is cold."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load() -> float:
    return os.getloadavg()[0]


class Case:
    """One row: a command timed `repeat` times."""

    def __init__(self, section: str, label: str, command: list[str], *, input_bytes: int, env: dict | None = None,
                 cleanup: list[Path] = (), params: dict | None = None, slow: bool = False) -> None:
        self.section, self.label, self.command, self.env, self.slow = section, label, command, env, slow
        self.input_bytes, self.cleanup, self.params = input_bytes, list(cleanup), params or {}

    def shown_command(self) -> str:
        """The command as a shell line, with the environment variables this case sets (which code it runs)."""
        changed = {k: v for k, v in (self.env or {}).items() if k in ("PYTHONPATH", "BEMA_OFFLINE_KERNEL") and os.environ.get(k) != v}
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())), shlex.join(self.command)])

    def run(self, repeat: int, files: list[Path], *, cold: bool = False) -> dict:
        """Time the command `repeat` times (once if it is a slow baseline: its noise matters less)."""
        repeat = 1 if self.slow else repeat
        walls, rss, loads, inside, reads = [], [], [], [], []
        warm(files)
        for _ in range(repeat):
            for path in self.cleanup:
                remove(path)
            if cold:
                evict(files)
            loads.append(load())
            wall, peak, stdout, read = measure(self.command, env=self.env)
            walls.append(wall)
            rss.append(peak)
            inside.append(inprocess_seconds(stdout))
            reads.append(read)
        for path in self.cleanup:
            remove(path)
        row = {
            "section": self.section,
            "label": self.label,
            "command": self.shown_command(),
            "input_bytes": self.input_bytes,
            "walls": walls,
            "rss": rss,
            "load": loads,
            "inprocess": inside,
            "read_bytes": reads,
            **self.params,
        }
        print(f"  {self.label:<52} best {min(walls):7.2f} s  median {statistics.median(walls):7.2f} s  "
              f"peak RSS {max(rss) / 2**20:7.0f} MiB  load {loads[0]:.1f}", flush=True)
        return row


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- inputs -----------------------------------------------------------------------------------------------------


def synthetic(root: Path, name: str, *, size: int, checkpoints: int, dtype: str = "bfloat16", shards: int = 1) -> tuple[Path, Path]:
    """Generate (or reuse) a synthetic run with scripts/synthetic_run.py, in a process of its own."""
    folder = root / name
    command = [sys.executable, str(SCRIPTS / "synthetic_run.py"), str(folder), "--size", str(size),
               "--checkpoints", str(checkpoints), "--dtype", dtype, "--shards", str(shards)]
    if not (folder / "spec.json").is_file():
        print(f"generating {folder} ({checkpoints} checkpoints of {size / GIB:.2f} GiB)...", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder / "run", folder / "base"


def input_files(run_dir: Path, base_dir: Path, max_step: int | None = None) -> list[Path]:
    files = sorted(base_dir.glob("*.safetensors"))
    for checkpoint in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        if max_step is None or int(checkpoint.name.split("-")[1]) <= max_step:
            files += sorted(checkpoint.glob("*.safetensors"))
    return files


def previous_engine(ref: str, into: Path) -> tuple[Path, str]:
    """Extract `bema_offline/` as of git `ref` into a folder, with its own C kernel built in place where it has one
    (else an editable install's finder would hand it this checkout's); return the folder and the commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "bema_offline", "setup.py", "pyproject.toml"], cwd=REPO,
                             capture_output=True, check=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if any((into / "bema_offline" / where / "_kernel.c").is_file() for where in (".", "engine")):
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into, capture_output=True, check=True)
    check_import(into)
    return into, commit


def code_version() -> str:
    """The commit of the code measured (`bema_offline/` of this checkout), marked `+changes` if it has any."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "bema_offline"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (commit or "unknown") + ("+changes" if dirty else "")


def check_import(pythonpath: Path) -> None:
    """Make sure that `python -m bema_offline` with this PYTHONPATH runs the code in that folder."""
    probe = ("import bema_offline; print(bema_offline.__file__)\n"
             "for name in ('bema_offline.engine._kernel', 'bema_offline._kernel'):\n"
             "    try:\n        k = __import__(name, fromlist=['_']); print(k.__file__); break\n    except ImportError:\n        pass")
    found = subprocess.run([sys.executable, "-c", probe], env=env_with(pythonpath), capture_output=True, text=True, check=True).stdout.split()
    for path in found:
        if not Path(path).resolve().is_relative_to(pythonpath.resolve()):
            raise RuntimeError(f"PYTHONPATH={pythonpath} imports {path}; run from a folder without bema_offline/, with the kernel built in place")


def env_with(pythonpath: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(pythonpath)}


def bema(run_dir: Path, base_dir: Path, out: Path, *extra: str) -> list[str]:
    # not -q: its last line says how long it took after startup (the progress bars go to stderr, to a file)
    return [sys.executable, "-m", "bema_offline", "average", str(run_dir), "--base-model", str(base_dir), "-o", str(out), *extra]


def raw_write(section: str, label: str, out: Path, nbytes: int, params: dict | None = None) -> Case:
    """The floor that the output's file system sets: `nbytes` written beside `out` and fsynced (dd), nothing else."""
    command = ["dd", "if=/dev/zero", f"of={out}.dd", "bs=1M", f"count={nbytes // 2**20}", "conv=fsync"]
    return Case(section, label, command, input_bytes=0, cleanup=[Path(f"{out}.dd")], params=params)


def main_run(args) -> tuple[Path, Path, list[Path], int]:
    """The main case, 8 checkpoints + base of about 1 GiB of bf16 each: run folder, base folder, the files read
    and their bytes."""
    run_dir, base_dir = synthetic(args.root, "run-1g", size=GIB, checkpoints=8)
    files = input_files(run_dir, base_dir)
    return run_dir, base_dir, files, sum(f.stat().st_size for f in files)


# --- sections ---------------------------------------------------------------------------------------------------


def section_main(args, scratch: Path) -> list[dict]:
    run_dir, base_dir, files, nbytes = main_run(args)
    out, shm = scratch / "out", Path("/dev/shm") / f"bema-bench-{os.getpid()}"
    here = env_with(REPO)
    check_import(REPO)
    previous, commit = previous_engine(args.previous, scratch / "previous")
    cases = [
        Case("main", "raw read (cat)", ["cat", *map(str, files)], input_bytes=nbytes),
        Case("main", "startup only: python -c 'import bema_offline.cli' (Python; torch is not imported)",
             [sys.executable, "-c", "import bema_offline.cli"], input_bytes=0, env=here),
        Case("main", "naive baseline (scripts/naive_baseline.py)",
             [sys.executable, str(SCRIPTS / "naive_baseline.py"), str(run_dir), "--base-model", str(base_dir), "--output", str(out)],
             input_bytes=nbytes, cleanup=[out], slow=True),
        Case("main", f"previous engine ({args.previous} = {commit})", bema(run_dir, base_dir, out), input_bytes=nbytes,
             env=env_with(previous), cleanup=[out], slow=True),
        raw_write("main", "raw write of the 1 GiB output, fsynced (dd)", out, GIB),
        Case("main", "bema-average", bema(run_dir, base_dir, out), input_bytes=nbytes, env=here, cleanup=[out]),
        Case("main", "bema-average, output on tmpfs", bema(run_dir, base_dir, shm), input_bytes=nbytes, env=here, cleanup=[shm]),
        Case("main", "bema-average, C kernel off (BEMA_OFFLINE_KERNEL=0: torch's ops)", bema(run_dir, base_dir, out),
             input_bytes=nbytes, env={**here, "BEMA_OFFLINE_KERNEL": "0"}, cleanup=[out]),
        Case("main", "bema-average --threads 1", bema(run_dir, base_dir, out, "--threads", "1"), input_bytes=nbytes,
             env=here, cleanup=[out]),
    ]
    return [case.run(args.repeat, files) for case in cases]


def section_sweep(args, scratch: Path) -> list[dict]:
    """One config, a sweep of 8 in one pass, and 8 separate runs: on the main run with output on disk (8 GiB of
    fsynced writes), and on 8 checkpoints of 0.5 GiB with output on tmpfs (the engine alone; 8 × 1 GiB of output
    would not fit in RAM beside the page-cached inputs)."""
    rows = []
    here = env_with(REPO)
    cases = [("disk", "run-1g", GIB, 8, scratch), ("tmpfs", "run-05g-16", GIB // 2, 16, Path("/dev/shm") / f"bema-bench-{os.getpid()}")]
    for where, name, size, checkpoints, root in cases:
        run_dir, base_dir = synthetic(args.root, name, size=size, checkpoints=checkpoints)
        files = input_files(run_dir, base_dir, max_step=3200)
        nbytes = sum(f.stat().st_size for f in files)
        out = root / "sweep"
        narrow = ["--max-step", "3200"]
        tag = f"{size / GIB:g} GiB × 8, output on {where}"
        grids = [("4 ema_power × 2 bias_power: 4 EMAs", SWEEP_GRID)]
        if where == "tmpfs":
            grids.append(("8 ema_power: 8 EMAs", ["ema_power=0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"]))
        rows.append(Case("sweep", f"1 config ({tag})", bema(run_dir, base_dir, out, *narrow), input_bytes=nbytes, env=here,
                         cleanup=[out], params={"configs": 1, "output": where}).run(args.repeat, files))
        # the floor that the output's file system sets: writing (and fsyncing) 8 outputs' bytes, nothing else
        out.parent.mkdir(parents=True, exist_ok=True)
        rows.append(raw_write("sweep", f"raw write of 8 outputs' bytes, fsynced (dd; {tag})", out, 8 * size,
                              params={"configs": 8, "output": where}).run(args.repeat, files))
        for label, grid in grids:
            rows.append(Case("sweep", f"8 configs in one pass, {label} ({tag})", bema(run_dir, base_dir, out, *narrow, "--grid", *grid),
                             input_bytes=nbytes, env=here, cleanup=[out], params={"configs": 8, "output": where}).run(args.repeat, files))
        separate = []
        for ema_power in ("0.3", "0.4", "0.5", "0.6"):
            for bias_power in ("0.1", "0.2"):
                command = bema(run_dir, base_dir, out, *narrow, "--ema-power", ema_power, "--bias-power", bias_power)
                separate.append(Case("sweep", f"  run ema_power={ema_power},bias_power={bias_power}", command, input_bytes=nbytes,
                                     env=here, cleanup=[out]).run(1, files))
        rows.append({
            "section": "sweep", "label": f"8 separate runs, sum ({tag})", "command": "8 × bema-average --ema-power E --bias-power B",
            "input_bytes": 8 * nbytes, "walls": [sum(r["walls"][0] for r in separate)], "rss": [max(r["rss"][0] for r in separate)],
            "load": [separate[0]["load"][0]], "inprocess": [sum(r["inprocess"][0] or 0 for r in separate)], "configs": 8, "output": where,
        })
        print(f"  8 separate runs ({tag}): {rows[-1]['walls'][0]:.2f} s", flush=True)
    return rows


def section_methods(args, scratch: Path) -> list[dict]:
    """Issue 13: a weighted sum (`--method uniform`) against the BEMA replay on the main run, and 8 outputs of 8
    methods in one pass against one config plus writing the 7 extra outputs' bytes."""
    run_dir, base_dir, files, nbytes = main_run(args)
    out, shm = scratch / "out", Path("/dev/shm") / f"bema-bench-{os.getpid()}" / "out"
    here = env_with(REPO)
    cases = [
        Case("methods", "bema (replay), output on disk", bema(run_dir, base_dir, out), input_bytes=nbytes, env=here, cleanup=[out]),
        Case("methods", "uniform (weighted sum), output on disk", bema(run_dir, base_dir, out, "--method", "uniform"),
             input_bytes=nbytes, env=here, cleanup=[out]),
        Case("methods", "bema (replay), output on tmpfs", bema(run_dir, base_dir, shm), input_bytes=nbytes, env=here, cleanup=[shm]),
        Case("methods", "uniform (weighted sum), output on tmpfs", bema(run_dir, base_dir, shm, "--method", "uniform"),
             input_bytes=nbytes, env=here, cleanup=[shm]),
        raw_write("methods", "raw write of 7 outputs' bytes, fsynced (dd)", out, 7 * GIB),
        Case("methods", "8 methods in one pass, output on disk", bema(run_dir, base_dir, out, "--grid", *METHODS_GRID),
             input_bytes=nbytes, env=here, cleanup=[out], params={"configs": 8}),
    ]
    shm.parent.mkdir(parents=True, exist_ok=True)
    return [case.run(args.repeat, files) for case in cases]


def section_budget(args, scratch: Path) -> list[dict]:
    run_dir, base_dir, files, nbytes = main_run(args)
    out = scratch / "out"
    rows = [Case("budget", "--dry-run (baseline: Python, headers)", bema(run_dir, base_dir, out, "--dry-run"),
                 input_bytes=0, env=env_with(REPO), params={"max_memory": 0}).run(args.repeat, files)]
    for budget in ("4MiB", "8MiB", "16MiB", "64MiB", "256MiB", "512MiB", "2GiB"):
        rows.append(Case("budget", f"--max-memory {budget}", bema(run_dir, base_dir, out, "--max-memory", budget),
                         input_bytes=nbytes, env=env_with(REPO), cleanup=[out],
                         params={"max_memory": _size(budget)}).run(args.repeat, files))
    return rows


def section_count(args, scratch: Path) -> list[dict]:
    run_dir, base_dir = synthetic(args.root, "run-05g-16", size=GIB // 2, checkpoints=16)
    out = scratch / "out"
    rows = []
    for count in (2, 4, 8, 16):
        files = input_files(run_dir, base_dir, max_step=400 * count)
        nbytes = sum(f.stat().st_size for f in files)
        rows.append(Case("count", f"bema-average, {count} checkpoints", bema(run_dir, base_dir, out, "--max-step", str(400 * count)),
                         input_bytes=nbytes, env=env_with(REPO), cleanup=[out],
                         params={"checkpoints": count, "tool": "bema-average"}).run(args.repeat, files))
        naive_run = scratch / f"naive-{count}"
        if naive_run.exists():
            shutil.rmtree(naive_run)
        naive_run.mkdir(parents=True)
        for checkpoint in sorted(run_dir.glob("checkpoint-*")):
            if int(checkpoint.name.split("-")[1]) <= 400 * count:
                (naive_run / checkpoint.name).symlink_to(checkpoint)
        rows.append(Case("count", f"naive baseline, {count} checkpoints",
                         [sys.executable, str(SCRIPTS / "naive_baseline.py"), str(naive_run), "--base-model", str(base_dir),
                          "--output", str(out)], input_bytes=nbytes, cleanup=[out],
                         params={"checkpoints": count, "tool": "naive"}, slow=True).run(args.repeat, files))
    return rows


def section_linearity(args, scratch: Path) -> list[dict]:
    out = Path("/dev/shm") / f"bema-bench-{os.getpid()}" / "out"  # (see NOTES["linearity"])
    rows = []
    # the 0.5 and 1 GiB points reuse the first two checkpoints of the count and main runs
    runs = {GIB // 4: ("run-lin-256m", 2), GIB // 2: ("run-05g-16", 16), GIB: ("run-1g", 8), 2 * GIB: ("run-lin-2048m", 2),
            4 * GIB: ("run-lin-4096m", 2)}
    for size, (name, checkpoints) in runs.items():
        run_dir, base_dir = synthetic(args.root, name, size=size, checkpoints=checkpoints)
        files = input_files(run_dir, base_dir, max_step=800)
        nbytes = sum(f.stat().st_size for f in files)
        rows.append(Case("linearity", f"raw read, {size / GIB:g} GiB per checkpoint", ["cat", *map(str, files)],
                         input_bytes=nbytes, params={"size": size, "tool": "raw"}).run(args.repeat, files))
        rows.append(Case("linearity", f"bema-average, {size / GIB:g} GiB per checkpoint",
                         bema(run_dir, base_dir, out, "--max-step", "800"), input_bytes=nbytes, env=env_with(REPO), cleanup=[out],
                         params={"size": size, "tool": "bema-average"}).run(args.repeat, files))
    return rows


GROUPS_PROBE = """
import sys, time
from pathlib import Path
from bema_offline import BEMASchedule
from bema_offline.engine import engine
from bema_offline.engine.plan import make_plan
cache = None if sys.argv[3] == "whole" else int(sys.argv[3]) * 2**20
engine.CACHE_BYTES = cache
plan = make_plan(sys.argv[1], [("", BEMASchedule())], base_model_dir=Path(sys.argv[2]))
class Null(engine.Sink):
    def write(self, output_index, piece, data):
        pass
run = engine.Engine(plan, Null(), max_memory=512 * 2**20)
started, cpu = time.perf_counter(), time.process_time()
run.run()
print(f"{len(run.groups)} groups, {time.process_time() - cpu:.2f} s of CPU; computed in {time.perf_counter() - started:.2f} s")
"""


def section_groups(args, scratch: Path) -> list[dict]:
    """Why the engine does not use all of --max-memory: the engine alone (no writes), in-process, with groups capped
    at various sizes per worker (engine.CACHE_BYTES; "whole" lets groups fill the 512 MiB budget)."""
    run_dir, base_dir, files, nbytes = main_run(args)
    rows = []
    for cache in ("2", "8", "32", "128", "whole"):
        label = f"engine only, groups ≤ {cache} MiB per worker" if cache != "whole" else "engine only, groups fill the budget"
        rows.append(Case("groups", label, [sys.executable, "-c", GROUPS_PROBE, str(run_dir), str(base_dir), cache],
                         input_bytes=nbytes, env=env_with(REPO), params={"cache": cache}).run(args.repeat, files))
    return rows


def section_stepwise(args, scratch: Path) -> list[dict]:
    """The step-major engine (engine/stepwise.py, for --no-keep-downloads) against `Engine` on the same run, in-process
    (scripts/stepwise_probe.py: plan, engine and writer, output on disk)."""
    run_dir, base_dir = synthetic(args.root, "run-256m", size=GIB // 4, checkpoints=8)
    files = input_files(run_dir, base_dir)
    nbytes = sum(f.stat().st_size for f in files)
    out, probe = scratch / "out", str(SCRIPTS / "stepwise_probe.py")
    here = env_with(REPO)
    cases = [
        Case("stepwise", "Engine (group-major: every checkpoint on disk)", [sys.executable, probe, str(run_dir), str(base_dir), str(out), "engine"],
             input_bytes=nbytes, env=here, cleanup=[out]),
        Case("stepwise", "StepwiseEngine (step-major: one checkpoint at a time, state on disk)",
             [sys.executable, probe, str(run_dir), str(base_dir), str(out), "stepwise"], input_bytes=nbytes, env=here, cleanup=[out]),
    ]
    return [case.run(args.repeat, files) for case in cases]


def section_cold(args, scratch: Path) -> list[dict]:
    """The inputs evicted from the page cache before each repeat: reads come from the disk."""
    run_dir, base_dir, files, nbytes = main_run(args)
    out = scratch / "out"
    cases = [
        Case("cold", "raw read (cat), cold cache", ["cat", *map(str, files)], input_bytes=nbytes),
        Case("cold", "bema-average, cold cache", bema(run_dir, base_dir, out), input_bytes=nbytes, env=env_with(REPO), cleanup=[out]),
    ]
    return [case.run(args.repeat, files, cold=True) for case in cases]


LAYOUTS = (("bin", "PyTorch .bin (torch.save)"), ("dcp", "FSDP sharded checkpoint (DCP)"), ("zero3", "DeepSpeed ZeRO-3, 2 partitions"))


def layout_files(run_dir: Path, base_dir: Path) -> list[Path]:
    """Every file of a run's checkpoints and base model that holds weights (what `cat` reads)."""
    names = ("*.safetensors", "*.bin", "pytorch_model_fsdp_0/*", "global_step*/*")
    return sorted(path for folder in [base_dir, *run_dir.glob("checkpoint-*")] for name in names for path in folder.glob(name) if path.is_file())


def section_layouts(args, scratch: Path) -> list[dict]:
    """The same weights (base + 4 checkpoints of 0.5 GiB of fp32) in each layout: `bema-average` and `cat` of the
    files, and `--dry-run` (reading the headers only), beside the safetensors run."""
    run_dir, base_dir = synthetic(args.root, "run-layouts", size=GIB // 2, checkpoints=4, dtype="float32")
    out, here = Path("/dev/shm") / f"bema-bench-{os.getpid()}" / "out", env_with(REPO)  # (see NOTES["layouts"])
    tensor_bytes = sum(f.stat().st_size for f in input_files(run_dir, base_dir))  # safetensors: the tensors, plus tiny headers
    runs = [("safetensors", "safetensors (the reference)", run_dir, base_dir)]
    for layout, title in LAYOUTS:
        target = args.root / f"run-layouts-{layout}"
        print(f"converting to {target} ({layout})...", flush=True)
        subprocess.run([sys.executable, str(SCRIPTS / "layout_runs.py"), str(run_dir.parent), str(target), "--layout", layout], check=True)
        runs.append((layout, title, target / "run", target / "base"))
    rows = []
    for layout, title, layout_run, layout_base in runs:
        files = layout_files(layout_run, layout_base)
        nbytes = sum(f.stat().st_size for f in files)
        params = {"layout": layout}
        cases = [
            Case("layouts", f"{title}: raw read of its files (cat)", ["cat", *map(str, files)], input_bytes=nbytes, params=params),
            Case("layouts", f"{title}: bema-average --dry-run (headers only)", bema(layout_run, layout_base, out, "--dry-run"),
                 input_bytes=0, env=here, params=params),
            Case("layouts", f"{title}: bema-average", bema(layout_run, layout_base, out), input_bytes=tensor_bytes, env=here,
                 cleanup=[out], params=params),
        ]
        rows += [case.run(args.repeat, files) for case in cases]
    return rows


def lora_inputs(args) -> tuple[Path, Path, list[Path]]:
    """Issue 11's case, generated by scripts/bench_lora.py (reused): a 1 GiB bf16 base, 8 adapter checkpoints with
    r = 16 on every linear layer. Returns the run folder, the base folder and the files read."""
    root = args.root / "lora-1g"
    if not (root / "spec.json").is_file():
        print(f"generating {root} (a 1 GiB base and 8 adapter checkpoints)...", flush=True)
    command = [sys.executable, str(SCRIPTS / "bench_lora.py"), str(root), "--size", str(GIB), "--checkpoints", "8", "--rank", "16"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    run_dir, base_dir = root / "run", root / "base"
    files = [base_dir / "model.safetensors"] + sorted(run_dir.glob("checkpoint-*/adapter_model.safetensors"))
    return run_dir, base_dir, files


def section_lora(args, scratch: Path) -> list[dict]:
    """A LoRA run: the merged output against issue 11's floor, a cat of the base and a dd of the output (fsynced),
    measured in the same run; the adapter outputs and --lora-average factors beside it."""
    run_dir, base_dir, files = lora_inputs(args)
    nbytes = sum(f.stat().st_size for f in files)
    base_bytes = files[0].stat().st_size
    out = scratch / "out"
    here = env_with(REPO)
    check_import(REPO)
    cases = [
        Case("lora", "raw read of the base (cat)", ["cat", str(files[0])], input_bytes=base_bytes),
        raw_write("lora", "raw write of the merged output's bytes, fsynced (dd)", out, base_bytes),
        Case("lora", "startup only: python -c 'import torch, bema_offline.cli'", [sys.executable, "-c", "import torch, bema_offline.cli"],
             input_bytes=0, env=here),
        Case("lora", "bema-average, merged", bema(run_dir, base_dir, out), input_bytes=nbytes, env=here, cleanup=[out]),
        Case("lora", "bema-average, merged, --threads 1", bema(run_dir, base_dir, out, "--threads", "1"), input_bytes=nbytes, env=here,
             cleanup=[out]),
        Case("lora", "bema-average, merged, --lora-average factors", bema(run_dir, base_dir, out, "--lora-average", "factors"),
             input_bytes=nbytes, env=here, cleanup=[out]),
        Case("lora", "bema-average --lora-output adapter (lossless: rank 16 × 8)", bema(run_dir, base_dir, out, "--lora-output", "adapter"),
             input_bytes=nbytes - base_bytes, env=here, cleanup=[out]),
        Case("lora", "bema-average --lora-output adapter --lora-rank 16",
             bema(run_dir, base_dir, out, "--lora-output", "adapter", "--lora-rank", "16"), input_bytes=nbytes - base_bytes, env=here,
             cleanup=[out]),
    ]
    return [case.run(args.repeat, files) for case in cases]
def interleaved(cases: list[Case], repeat: int, files: list[Path]) -> list[dict]:
    """Time several cases in turns (A, B, A, B, ...), so that a change in the machine's load hits them alike; one row
    per case, as `Case.run` makes it, plus the CPU time (user + system) of each run: on a machine shared with other
    work, it moves far less than the wall time."""
    rows = [None] * len(cases)
    for _ in range(repeat):
        for index, case in enumerate(cases):
            warm(files)
            for path in case.cleanup:
                remove(path)
            before, started_load = resource.getrusage(resource.RUSAGE_CHILDREN), load()
            wall, peak, stdout, read = measure(case.command, env=case.env)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            for path in case.cleanup:
                remove(path)
            row = rows[index] = rows[index] or {"section": case.section, "label": case.label, "command": case.shown_command(),
                                                "input_bytes": case.input_bytes, "walls": [], "rss": [], "load": [],
                                                "inprocess": [], "read_bytes": [], "cpu": [], **case.params}
            for key, value in (("walls", wall), ("rss", peak), ("load", started_load), ("inprocess", inprocess_seconds(stdout)),
                               ("read_bytes", read), ("cpu", cpu)):
                row[key].append(value)
    for row in rows:
        print(f"  {row['label']:<52} best {min(row['walls']):7.2f} s  median {statistics.median(row['walls']):7.2f} s  "
              f"CPU median {statistics.median(row['cpu']):6.2f} s  ({repeat} turns)", flush=True)
    return rows


def section_hash(args, scratch: Path) -> list[dict]:
    """What hashing every output shard while writing it costs (issue 10): the main case with the code of `--previous`
    (give a commit before the hashes) and with this checkout's, in turns, with the output on tmpfs (where the run is
    bound by the CPU, so that the hash's cost shows in full) and on disk; and verify of the output, which now hashes
    every shard in the same read that checks the values."""
    run_dir, base_dir, files, nbytes = main_run(args)
    here = env_with(REPO)
    check_import(REPO)
    previous, commit = previous_engine(args.previous, scratch / "previous")
    before = f"before content hashes ({args.previous} = {commit})"
    rows = []
    for where, out in (("tmpfs", Path("/dev/shm") / f"bema-bench-{os.getpid()}" / "out"), ("disk", scratch / "out")):
        rows += interleaved([
            Case("hash", f"bema-average, output on {where}, {before}", bema(run_dir, base_dir, out), input_bytes=nbytes,
                 env=env_with(previous), cleanup=[out], params={"output": where, "hashes": False}),
            Case("hash", f"bema-average, output on {where}, sha256 of every shard while writing", bema(run_dir, base_dir, out),
                 input_bytes=nbytes, env=here, cleanup=[out], params={"output": where, "hashes": True}),
        ], args.repeat, files)
    # each version verifies its own output (the weights are the same bytes; the older record has no sha256)
    outputs = {"before": scratch / "out-before", "after": scratch / "out-after"}
    subprocess.run(bema(run_dir, base_dir, outputs["before"]), env=env_with(previous), check=True, capture_output=True)
    subprocess.run(bema(run_dir, base_dir, outputs["after"]), env=here, check=True, capture_output=True)
    shards = {key: sorted(out.glob("*.safetensors")) for key, out in outputs.items()}
    size = sum(path.stat().st_size for path in shards["after"])
    rows += interleaved([
        Case("hash", f"bema-offline verify (values only), {before}", verify_command(outputs["before"]), input_bytes=size,
             env=env_with(previous), params={"verify": True, "hashes": False}),
        Case("hash", "bema-offline verify (values and sha256, one read)", verify_command(outputs["after"]), input_bytes=size,
             env=here, params={"verify": True, "hashes": True}),
    ], args.repeat, shards["before"] + shards["after"])
    return rows


def verify_command(output: Path) -> list[str]:
    return [sys.executable, "-m", "bema_offline", "verify", str(output)]


MOE_GENERATOR = """
import json, math, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
root, layout, size, checkpoints = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hidden, experts, layers = 128, 416, 16
# MoE-like: per layer 416 experts x (gate, up, down) of moe_intermediate x hidden, a router, attention and norms
inter = max(1, (size // 2 // layers - 4 * hidden * hidden - experts * hidden - 2 * hidden) // (3 * experts * hidden))
shapes = {}
for i in range(layers):
    p = f"model.layers.{i}."
    shapes[p + "input_layernorm.weight"] = (hidden,)
    for proj in "qkvo":
        shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
    shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes[p + "mlp.gate.weight"] = (experts, hidden)
    for e in range(experts):
        for proj, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            shapes[p + f"mlp.experts.{e}.{proj}_proj.weight"] = shape
if layout == "few":  # the same number of elements in 8 large tensors
    total = sum(math.prod(shape) for shape in shapes.values())
    shapes = {f"model.fused.{i}.weight": (total // 8 + (i < total % 8),) for i in range(8)}
names = list(shapes)
sizes = [math.prod(shapes[n]) for n in names]
generator = torch.Generator().manual_seed(0)
flat = 0.02 * torch.randn(sum(sizes), generator=generator)
config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden, "torch_dtype": "bfloat16"}
for k in range(checkpoints + 1):
    folder = root / ("base" if k == 0 else f"run/checkpoint-{400 * k}")
    folder.mkdir(parents=True, exist_ok=True)
    parts = torch.split(flat.to(torch.bfloat16), sizes)
    save_file({n: t.view(shapes[n]).clone() for n, t in zip(names, parts)}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    flat.add_(torch.randn(flat.numel(), generator=generator), alpha=0.001)
(root / "spec.json").write_text(json.dumps({"layout": layout, "size": size, "checkpoints": checkpoints, "tensors": len(names)}))
"""


def moe_run(root: Path, layout: str, *, size: int, checkpoints: int) -> tuple[Path, Path, int]:
    """Generate (or reuse) an MoE-like run of about `size` bytes of bf16 per checkpoint: `many` small tensors (about
    20,000), or the same elements in 8 large tensors (`few`); returns (run_dir, base_dir, tensors)."""
    folder = root / f"run-moe-{layout}-{size // 2**20}m"
    spec = {"layout": layout, "size": size, "checkpoints": checkpoints}
    recorded = json.loads((folder / "spec.json").read_text()) if (folder / "spec.json").is_file() else {}
    if {key: recorded.get(key) for key in spec} != spec:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {folder} ({checkpoints} checkpoints of {size / GIB:.2f} GiB, {layout} tensors)...", flush=True)
        subprocess.run([sys.executable, "-c", MOE_GENERATOR, str(folder), layout, str(size), str(checkpoints)], check=True)
        recorded = json.loads((folder / "spec.json").read_text())
    return folder / "run", folder / "base", recorded["tensors"]


def section_many_tensors(args, scratch: Path) -> list[dict]:
    """The same bytes as thousands of small tensors (an MoE's experts) and as a few large ones, averaged and verified;
    and the small tensors again with one output shard each. Outputs go to tmpfs, so that the per-tensor and per-shard
    costs show rather than the disk's (20,000 shards mean 20,000 fsyncs on a disk)."""
    here = env_with(REPO)
    check_import(REPO)
    out = Path("/dev/shm") / f"bema-bench-{os.getpid()}" / "out"
    rows = []
    for layout, shard_size in (("few", "5GB"), ("many", "5GB"), ("many", "1B")):
        run_dir, base_dir, tensors = moe_run(args.root, layout, size=GIB // 4, checkpoints=8)
        files = input_files(run_dir, base_dir)
        nbytes = sum(f.stat().st_size for f in files)
        shards = "one output shard each (--max-shard-size 1B)" if shard_size == "1B" else "one output shard"
        what = f"{tensors:,} tensors, {shards}"
        params = {"tensors": tensors, "shards": shard_size}
        rows.append(Case("many-tensors", f"bema-average, {what}", bema(run_dir, base_dir, out, "--max-shard-size", shard_size),
                         input_bytes=nbytes, env=here, cleanup=[out], params={**params, "tool": "average"}).run(args.repeat, files))
        subprocess.run(bema(run_dir, base_dir, out, "--max-shard-size", shard_size), env=here, check=True, capture_output=True)
        shards = sorted(out.glob("*.safetensors"))
        rows.append(Case("many-tensors", f"bema-offline verify, {what}", verify_command(out), input_bytes=sum(f.stat().st_size for f in shards),
                         env=here, params={**params, "tool": "verify"}).run(args.repeat, files))
        remove(out)
    return rows


def _size(text: str) -> int:
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(text[:-3]) * units[text[-3:]])


# --- report -----------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kib / 2**20, 1), "python": platform.python_version(),
            "torch": torch_version, "kernel": platform.release()}


def _row(r: dict, *, reads: bool = False) -> str:
    best, median = min(r["walls"]), statistics.median(r["walls"])
    rate = r["input_bytes"] / best / 1e9 if r["input_bytes"] else 0
    inside = [t for t in r.get("inprocess", []) if t is not None]
    after = f"{min(inside):.2f}" if inside else ""
    row = (f"| {r['label']} | {best:.2f} | {median:.2f} | {after} | {len(r['walls'])} | {max(r['rss']) / 2**20:.0f} | "
           f"{rate:.2f} | {r['load'][0]:.1f} |")
    if reads:
        read = [b for b in r.get("read_bytes", []) if b is not None]
        ratio = f"{max(read) / r['input_bytes']:.3f}" if read and r["input_bytes"] else ""
        row += f" {max(read) / 2**20:.0f} | {ratio} |" if read else " | |"
    return row


HEADER = ("| case | best wall (s) | median wall (s) | after startup (s) | runs | peak RSS (MiB) | input GB/s (best wall) "
          "| load avg at start |\n|---|---|---|---|---|---|---|---|")
READS_HEADER = HEADER.replace(" |\n", " | bytes read (MiB, rchar) | read / input |\n", 1) + "---|---|"
READS_SECTIONS = ("layouts",)  # sections whose rows also say how many bytes each process read


def write_report(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench.py`; numbers are whole processes (`python -m bema_offline average ...`, the naive",
        "baseline, `cat`) with a warm page cache unless said otherwise. Wall time: best and median of the repeats; 'after",
        "startup': the time the tool reports itself, once its imports are done (`bema-average`'s summary line,",
        "the naive baseline's last line); peak RSS: the child's `ru_maxrss` as the kernel reports it (the largest over the",
        "repeats). The load average is that of the whole machine, which other people's jobs share: it is noted per row.",
        "",
        f"- Machine: {meta['machine']['cores']} cores ({meta['machine']['cpu']}), {meta['machine']['ram_gib']} GiB RAM, "
        f"Linux {meta['machine']['kernel']}, Python {meta['machine']['python']}, torch {meta['machine']['torch']}",
    ]
    for name in SECTIONS:
        if name not in results["sections"]:
            continue
        section = results["sections"][name]
        at = f" at commit {section['commit']}" if section.get("commit") else ""
        lines += ["", f"## {TITLES[name]}", "", f"`{section['command']}` on {section['date']}{at} (repeats: {section['repeat']}; "
                  f"load average {section['load_before']:.1f} before, {section['load_after']:.1f} after)", ""]
        header = READS_HEADER if name in READS_SECTIONS else HEADER
        lines += [NOTES.get(name, ""), "", header] if NOTES.get(name) else [header]
        lines += [_row(r, reads=name in READS_SECTIONS) for r in section["rows"]]
        lines += ["", "<details><summary>commands</summary>", ""]
        lines += [f"- {r['label']}: `{r['command']}`" for r in section["rows"]]
        lines += ["", "</details>"]
    targets = _targets(results)
    if targets:
        lines += ["", "## Targets (issues 5, 10 and 13), against the rows above", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {target} | {measured} | {'yes' if met else '**no**'} |" for target, measured, met in targets]
    lora = _lora_targets(results)
    if lora:
        lines += ["", "## Issue 11's targets (LoRA), against the rows above", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {target} | {measured} | {'yes' if met else '**no**'} |" for target, measured, met in lora]
    ratios = _ratios(results)
    if ratios:
        lines += ["", "## Ratios (each from rows of one section, i.e. measured in one run)", ""] + [f"- {line}" for line in ratios]
    lines += ["", "![time and peak RSS against model size, checkpoint count and --max-memory](benchmarks.png)", ""]
    path.write_text("\n".join(lines))


TITLES = {
    "methods": "Averaging methods: a weighted sum against the BEMA replay, and 8 methods in one pass (8 × 1 GiB run)",
    "main": "8 checkpoints + base, about 1 GiB of bf16 each (9.2 GiB read)",
    "sweep": "Sweeps: 8 configs in one pass against one config and 8 separate runs (8 checkpoints + base)",
    "budget": "Peak RSS against --max-memory (8 × 1 GiB run)",
    "count": "Checkpoint count: 2 to 16 checkpoints of 0.5 GiB (one run, narrowed with --max-step)",
    "linearity": "Model size: 0.25 to 4 GiB per checkpoint (2 checkpoints + base, scaled down in count to fit the time)",
    "cold": "Cold page cache (inputs evicted with POSIX_FADV_DONTNEED before each repeat)",
    "groups": "Group size: the engine alone (in-process, no writes), groups capped at N MiB per worker",
    "layouts": "Checkpoint layouts: the same weights (base + 4 checkpoints of 0.5 GiB of fp32) as safetensors, .bin, FSDP, ZeRO-3",
    "stepwise": "Step-major engine (--no-keep-downloads) against Engine: 8 checkpoints + base of 256 MiB of bf16 each",
    "lora": "A LoRA run: a 1 GiB bf16 base and 8 adapter checkpoints, r = 16 on every linear layer (issue 11)",
    "hash": "Content hashes: the sha256 of every output shard, computed while writing (8 × 1 GiB run; A/B in turns)",
    "many-tensors": "Many tensors: about 20,000 small tensors (an MoE's experts) against the same bytes in 8 tensors "
                    "(8 checkpoints + base of 0.25 GiB of bf16; outputs on tmpfs)",
}
NOTES = {
    "layouts": "Each layout holds the very same fp32 weights (`scripts/layout_runs.py` rewrites the safetensors run): "
               "`.bin` by torch.save (base included), FSDP by torch.distributed.checkpoint.save in one process, ZeRO-3 in "
               "DeepSpeed's layout for 2 ranks (each tensor split in two, padded; the optimizer's moments left out); the "
               "DCP and ZeRO runs use the safetensors base. Input bytes are the tensors' (the safetensors files) for "
               "`bema-average` and each layout's files for `cat`. 'bytes read' is what the process read through read "
               "syscalls (pread included; Python's own startup reads about 5 MiB, see the dry runs): each input byte read "
               "once gives a 'read / input' of 1 plus that. Peak RSS is the same in every layout. The output (0.5 GiB) "
               "goes to tmpfs, so that the shared disk's write speed does not blur the comparison of the readers.",
    "stepwise": "Both write the same bytes (tests/engine/test_stepwise.py). The step-major engine reads and writes each "
                "group's state (θ0 and the EMA, float32) at every step: 8 bytes per element per step more traffic, on a "
                "128 M-element model 1 GiB of state on disk (4 bytes per element per θ0, EMA and weighted sum). Its disk "
                "high-water in a --no-keep-downloads run is one checkpoint and the one downloading ahead (HubDownloads."
                "peak_bytes, tests/sources/test_hub_source.py), plus that state, plus the output.",
    "lora": "Each checkpoint is W0 + s·B·A; the merged output (BEMA by default, from its effective weights) is "
            "W0 + [s·w₁B₁ | … | s·w₈B₈] @ [A₁; …; A₈]: a product of rank 128 per block of rows, 2·128 flops per output "
            "element (137 GFLOP here), in float32, then written in the base's bf16 and fsynced. The floor is the one issue "
            "11 states: a cat of the base plus a dd of the output's bytes. Startup includes importing torch, which the "
            "products need. The adapter outputs read only the adapters (200 MiB) and the base's header. The floor is "
            "out of reach on 2 cores: importing torch alone costs more than 1.5 × (cat + dd) whenever the disk writes "
            "1 GiB in under a second, and the products alone, at the ~100 GFLOP/s per core that MKL reaches here on "
            "these shapes, take 0.7 s of two cores; after startup the merged output costs the products, reading and "
            "casting 1 GiB, and about the dd's time to write and fsync it.",
    "groups": "The 'after startup' column is the engine's run; the peak RSS includes the groups' arenas. Small groups "
              "stay in the CPU cache from one step to the next; that is why the engine uses at most 8 MiB per worker "
              "whatever --max-memory allows (engine.CACHE_BYTES).",
    "budget": "The engine's groups take at most 8 MiB per worker thread (2 here) even when --max-memory allows more "
              "(see the group-size section); a smaller budget makes them smaller. Peak RSS is the Python baseline "
              "plus the arenas (torch is not imported for a bf16 run).",
    "linearity": "The output (one checkpoint's size) goes to tmpfs: on this machine's shared disk, writing and fsyncing "
                 "it takes about 2 s per GiB and would set the time alone from 2 GiB per checkpoint on.",
    "main": "`bema-average` writes a 1 GiB output and fsyncs it before publishing (the dd row: the same bytes written "
            "and fsynced, nothing else; this machine's disk is shared, and its speed varies by the minute); the naive "
            "baseline writes without fsync; `cat` writes nothing.",
    "methods": "One config of each kind on the main run (8 checkpoints + base, 1 GiB of bf16 each): the BEMA replay "
               "reads the base and 8 checkpoints, the uniform average the 8 checkpoints; then 8 outputs of 8 methods "
               "(bema, ema, dema, ouema, uniform --last 4, power-ema --sigma-rel 0.1, wsm --decay cosine --last 4, "
               "expo --alpha 0.3) in one read of the run, beside writing the 7 extra outputs' bytes alone (dd).",
    "hash": "Each pair of rows ran in turns (before, after, before, after, ...), so that the machine's load, shared with "
            "other work, hits both alike; the targets below also give each side's median CPU time (user + system), which "
            "other work moves far less than the wall time. The cost is SHA-256's own speed: about 1.7 GB/s on one core "
            "of this CPU (with SHA-NI), 0.65 s of CPU for the 1.1 GB output, against about 3 s of CPU for the whole "
            "run. verify reads the output once for both the values and the sha256 (and in 8 MiB reads: less memory).",
    "many-tensors": "The verify rows' input GB/s are of the output read. With one output shard per tensor, 20,000 "
                    "shards are created, written, fsynced (a no-op on tmpfs), hashed and published; before issue 10's "
                    "fix, the checks before publishing and in verify were quadratic in tensors × shards (97 s to average "
                    "and 129 s to verify 20,000 such tensors).",
    "sweep": "Each config writes its own output folder (1 or 0.5 GiB): on disk the sweep also measures the disk's "
             "write speed (the dd row: the same bytes written and fsynced, nothing else); on tmpfs, writing 8 outputs costs the "
             "kernel's page allocation and copy (its dd row), and the rest is the engine. Configs that differ only in "
             "bias_power share one EMA (only α differs), so the 4 × 2 grid updates 4 EMAs and the 8-value grid 8.",
}


def _best(results: dict, section: str, label_start: str) -> float | None:
    rows = results["sections"].get(section, {}).get("rows", [])
    walls = [min(r["walls"]) for r in rows if r["label"].startswith(label_start)]
    return walls[0] if walls else None


def _targets(results: dict) -> list[tuple[str, str, bool]]:
    """Each of the issues' targets (5, 10 and 13) with the measured value it is judged on."""
    rows = []
    raw, naive, ours = _best(results, "main", "raw read"), _best(results, "main", "naive"), _best(results, "main", "bema-average")
    if raw and naive and ours:
        rows.append(("final BEMA ≥ 6× faster than the naive baseline (whole processes)", f"{naive / ours:.1f}×", naive / ours >= 6))
        rows.append(("final BEMA ≤ 4× the raw read (whole process)", f"{ours / raw:.1f}×", ours / raw <= 4))
        tmpfs = _best(results, "main", "bema-average, output on tmpfs")
        if tmpfs:
            rows.append(("  the same, output on tmpfs (no wait for the disk to flush the 1 GiB output before publishing)",
                         f"{naive / tmpfs:.1f}× faster than naive; {tmpfs / raw:.1f}× the raw read",
                         naive / tmpfs >= 6 and tmpfs / raw <= 4))
        inside_ours, inside_naive = _after_startup(results, "main", "bema-average"), _after_startup(results, "main", "naive")
        if inside_ours and inside_naive:
            rows.append(("  the same, after startup (imports done)",
                         f"{inside_naive / inside_ours:.1f}× faster than naive; {inside_ours / raw:.1f}× the raw read",
                         inside_naive / inside_ours >= 6 and inside_ours / raw <= 4))
    main_rows = results["sections"].get("main", {}).get("rows", [])
    rss = [max(r["rss"]) for r in main_rows if r["label"] == "bema-average"]
    if rss:
        rows.append(("peak RSS ≤ 768 MiB with the default budget", f"{rss[0] / 2**20:.0f} MiB", rss[0] <= 768 * 2**20))
    count = {r["checkpoints"]: max(r["rss"]) for r in results["sections"].get("count", {}).get("rows", []) if r.get("tool") == "bema-average"}
    if 4 in count and 16 in count:
        rows.append(("peak RSS flat in checkpoints: 16 within 10% of 4", f"{count[16] / count[4]:.3f}", abs(count[16] / count[4] - 1) <= 0.1))
    budget_rows = results["sections"].get("budget", {}).get("rows", [])
    budget = [r for r in budget_rows if r.get("max_memory")]
    dry = [max(r["rss"]) for r in budget_rows if r.get("max_memory") == 0]
    if budget and dry:
        # --max-memory bounds the tensor data: peak RSS above the dry run (Python, the headers) stays within it
        above = [(r["max_memory"], max(r["rss"]) - dry[0]) for r in budget]
        spread = ", ".join(f"{size // 2**20} MiB → +{extra / 2**20:.0f}" for size, extra in above)
        rows.append(("peak RSS tracks --max-memory, lower or higher: RSS above the dry run ≤ the budget",
                     spread + " MiB above the dry run", all(extra <= size for size, extra in above)))
    for where, size in (("tmpfs", "0.5"), ("disk", "1")):
        tag = f"({size} GiB × 8, output on {where})"
        one = _best(results, "sweep", f"1 config {tag}")
        sweep = _best(results, "sweep", f"8 configs in one pass, 4 ema_power × 2 bias_power: 4 EMAs {tag}")
        distinct = _best(results, "sweep", f"8 configs in one pass, 8 ema_power: 8 EMAs {tag}")
        floor = _best(results, "sweep", f"raw write of 8 outputs' bytes, fsynced (dd; {tag})")
        if one and sweep:
            text = f"{sweep / one:.2f}× (4 × 2 grid)" + (f", {distinct / one:.2f}× (8 distinct EMAs)" if distinct else "")
            text += f"; writing the 8 outputs' bytes alone (dd) is {floor / one:.2f}× one config" if floor else ""
            rows.append((f"sweep of 8 configs ≤ 2.5× one config {tag}", text, sweep / one <= 2.5 and (not distinct or distinct / one <= 2.5)))
    replay, weighted = _best(results, "methods", "bema (replay), output on disk"), _best(results, "methods", "uniform (weighted sum), output on disk")
    if replay and weighted:
        replay_shm = _best(results, "methods", "bema (replay), output on tmpfs")
        weighted_shm = _best(results, "methods", "uniform (weighted sum), output on tmpfs")
        shm = f"; {weighted_shm / replay_shm:.2f}× with the output on tmpfs" if replay_shm and weighted_shm else ""
        rows.append(("--method uniform ≤ 1.1× the BEMA replay (issue 13)", f"{weighted / replay:.2f}× on disk{shm}", weighted / replay <= 1.1))
    eight, extra = _best(results, "methods", "8 methods in one pass"), _best(results, "methods", "raw write of 7 outputs")
    if replay and eight and extra:
        budget = replay + 1.3 * extra
        rows.append(("8 outputs of 8 methods in one pass ≤ one config + 1.3× dd of the 7 extra outputs (issue 13)",
                     f"{eight:.2f} s against {replay:.2f} + 1.3 × {extra:.2f} = {budget:.2f} s", eight <= budget))
    hashed = {(r["output"], r["hashes"]): r for r in results["sections"].get("hash", {}).get("rows", []) if "output" in r}
    for where in ("disk", "tmpfs"):
        if (where, False) in hashed and (where, True) in hashed:
            plain, with_hash = hashed[(where, False)], hashed[(where, True)]
            best = min(with_hash["walls"]) / min(plain["walls"])
            median = statistics.median(with_hash["walls"]) / statistics.median(plain["walls"])
            cpu = statistics.median(with_hash["cpu"]) - statistics.median(plain["cpu"])
            rows.append((f"sha256 of every shard while writing: at most a few percent slower (main case, output on {where})",
                         f"wall {best:.3f}× (best), {median:.3f}× (median); CPU +{cpu:.2f} s (medians)", best <= 1.05))
    many = {(r["tensors"] > 1000, r["shards"], r["tool"]): min(r["walls"]) for r in results["sections"].get("many-tensors", {}).get("rows", [])}
    for tool in ("average", "verify"):
        if (False, "5GB", tool) in many and (True, "5GB", tool) in many:
            ratio = many[(True, "5GB", tool)] / many[(False, "5GB", tool)]
            rows.append((f"20,000 small tensors ≤ 1.5× the same bytes in 8 tensors: {tool}", f"{ratio:.2f}×", ratio <= 1.5))
    linear = [(r["input_bytes"] / GIB, min(r["walls"])) for r in results["sections"].get("linearity", {}).get("rows", [])
              if r.get("tool") == "bema-average"]
    if len(linear) >= 3:
        slope, intercept, worst = _fit(linear)
        rows.append(("time linear in bytes, 0.25 → 4 GiB per checkpoint",
                     f"wall ≈ {intercept:.1f} s + {slope:.2f} s/GiB read; largest residual {worst:.0%} of the fitted time",
                     worst <= 0.15))
    return rows


def _lora_targets(results: dict) -> list[tuple[str, str, bool]]:
    """Issue 11's target (the merged output ≤ 1.5 × (cat of the base + dd of the output)), and peak RSS within the
    default --max-memory above what Python and torch take."""
    rows = []
    cat, dd = _best(results, "lora", "raw read of the base"), _best(results, "lora", "raw write of the merged")
    merged, startup = _best(results, "lora", "bema-average, merged"), _best(results, "lora", "startup only")
    if cat and dd and merged:
        text = f"{merged:.2f} s = {merged / (cat + dd):.2f} × ({cat:.2f} s + {dd:.2f} s)"
        if startup:
            text += f"; without the startup (Python, torch): {(merged - startup) / (cat + dd):.2f} ×"
        rows.append(("LoRA merged output ≤ 1.5 × (cat of the base + dd of the output)", text, merged <= 1.5 * (cat + dd)))
    section = results["sections"].get("lora", {}).get("rows", [])
    rss = {r["label"]: max(r["rss"]) for r in section}
    base_rss = next((v for k, v in rss.items() if k.startswith("startup only")), None)
    if base_rss and "bema-average, merged" in rss:
        above = rss["bema-average, merged"] - base_rss
        rows.append(("LoRA peak RSS ≤ the default --max-memory (512 MiB) above Python and torch",
                     f"{rss['bema-average, merged'] / 2**20:.0f} MiB, {above / 2**20:.0f} MiB above the startup", above <= 512 * 2**20))
    return rows


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least-squares line through (x, y): slope, intercept, and the largest residual relative to the fitted value."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    intercept = mean_y - slope * mean_x
    worst = max(abs(y - (intercept + slope * x)) / (intercept + slope * x) for x, y in points)
    return slope, intercept, worst


def _after_startup(results: dict, section: str, label_start: str) -> float | None:
    rows = results["sections"].get(section, {}).get("rows", [])
    times = [t for r in rows if r["label"].startswith(label_start) for t in r.get("inprocess", []) if t is not None]
    return min(times) if times else None


def _ratios(results: dict) -> list[str]:
    lines = []
    raw, naive = _best(results, "main", "raw read"), _best(results, "main", "naive")
    ours, previous, tmpfs = _best(results, "main", "bema-average"), _best(results, "main", "previous"), _best(results, "main", "bema-average, output on tmpfs")
    if raw and ours:
        lines.append(f"bema-average / raw read: {ours / raw:.2f}× (output on tmpfs: {tmpfs / raw:.2f}×)" if tmpfs else f"bema-average / raw read: {ours / raw:.2f}×")
    if naive and ours:
        lines.append(f"naive baseline / bema-average: {naive / ours:.1f}× faster")
    if previous and ours:
        change = f"{previous / ours:.2f}× faster" if previous >= ours else f"{ours / previous:.2f}× slower"
        lines.append(f"bema-average against the previous engine: {change} ({ours:.2f} s against {previous:.2f} s)")
    inside = {label: _after_startup(results, "main", label) for label in ("naive", "previous", "bema-average")}
    if all(inside.values()) and raw:
        lines.append(
            f"after startup (imports done; the tools' own timers): bema-average {inside['bema-average']:.2f} s = "
            f"{inside['bema-average'] / raw:.2f}× the raw read; naive / bema-average {inside['naive'] / inside['bema-average']:.1f}×; "
            f"bema-average / previous {inside['bema-average'] / inside['previous']:.2f}×"
        )
    for where, size in (("disk", "1"), ("tmpfs", "0.5")):
        tag = f"({size} GiB × 8, output on {where})"
        one, separate = _best(results, "sweep", f"1 config {tag}"), _best(results, "sweep", f"8 separate runs, sum {tag}")
        for grid in ("4 ema_power × 2 bias_power: 4 EMAs", "8 ema_power: 8 EMAs"):
            sweep = _best(results, "sweep", f"8 configs in one pass, {grid} {tag}")
            if one and sweep and separate:
                lines.append(f"sweep of 8 configs ({grid}) / 1 config {tag}: {sweep / one:.2f}× (8 separate runs: {separate / one:.2f}×)")
    count = results["sections"].get("count", {}).get("rows", [])
    rss = {r["checkpoints"]: max(r["rss"]) for r in count if r.get("tool") == "bema-average"}
    if 4 in rss and 16 in rss:
        lines.append(f"peak RSS, 16 / 4 checkpoints: {rss[16] / rss[4]:.3f}")
    return lines


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    sections = results["sections"]

    def series(section, key, tool):
        rows = [r for r in sections.get(section, {}).get("rows", []) if r.get("tool") == tool]
        rows.sort(key=lambda r: r[key])
        return [r[key] for r in rows], [min(r["walls"]) for r in rows], [max(r["rss"]) / 2**20 for r in rows]

    for tool, style in (("bema-average", "o-"), ("raw", "s--"), ("naive", "^:")):
        x, t, m = series("linearity", "size", tool)
        if x:
            axes[0][0].plot([v / GIB for v in x], t, style, label=tool)
            axes[1][0].plot([v / GIB for v in x], m, style, label=tool)
        x, t, m = series("count", "checkpoints", tool)
        if x:
            axes[0][1].plot(x, t, style, label=tool)
            axes[1][1].plot(x, m, style, label=tool)
    budget = [r for r in sections.get("budget", {}).get("rows", []) if r.get("max_memory")]
    if budget:
        x = [r["max_memory"] / 2**20 for r in budget]
        axes[0][2].plot(x, [min(r["walls"]) for r in budget], "o-", label="bema-average")
        axes[1][2].plot(x, [max(r["rss"]) / 2**20 for r in budget], "o-", label="bema-average")
        axes[1][2].plot(x, x, ":", color="gray", label="= budget")
        for ax in (axes[0][2], axes[1][2]):
            ax.set_xscale("log", base=2)
    titles = [("time vs GiB per checkpoint (2 ckpts + base)", "time vs checkpoints (0.5 GiB each)", "time vs --max-memory (8 × 1 GiB)"),
              ("peak RSS vs GiB per checkpoint", "peak RSS vs checkpoints", "peak RSS vs --max-memory")]
    xlabels = ("GiB per checkpoint", "checkpoints", "--max-memory (MiB)")
    for row in range(2):
        for col in range(3):
            ax = axes[row][col]
            ax.set_title(titles[row][col], fontsize=10)
            ax.set_xlabel(xlabels[col])
            ax.set_ylabel("wall (s)" if row == 0 else "peak RSS (MiB)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"bema-average benchmarks ({results['meta']['machine']['cores']} cores, warm page cache)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="+", choices=[*SECTIONS, "report"])
    parser.add_argument("--root", type=Path, default=Path("/tmp/bema-bench"), help="where synthetic runs live")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--previous", default="main", help="git ref of the previous engine")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "benchmarks.json")
    args = parser.parse_args()
    args.root, args.results = args.root.resolve(), args.results.resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    os.chdir(args.root)  # `python -m bema_offline` puts the working folder first on sys.path: keep the repo out of it
    results = json.loads(args.results.read_text()) if args.results.is_file() else {"sections": {}}
    results["meta"] = {"machine": machine()}
    runners = {"main": section_main, "sweep": section_sweep, "methods": section_methods, "budget": section_budget, "count": section_count,
               "linearity": section_linearity, "cold": section_cold, "groups": section_groups, "layouts": section_layouts,
               "stepwise": section_stepwise, "lora": section_lora, "hash": section_hash, "many-tensors": section_many_tensors}
    for name in args.sections:
        if name == "report":
            continue
        print(f"[{name}]", flush=True)
        args.root.mkdir(parents=True, exist_ok=True)
        before = load()
        with tempfile.TemporaryDirectory(dir=args.root, prefix="scratch-") as scratch:
            try:
                rows = runners[name](args, Path(scratch))
            finally:
                shutil.rmtree(Path("/dev/shm") / f"bema-bench-{os.getpid()}", ignore_errors=True)
        results["sections"][name] = {
            "rows": rows,
            "repeat": args.repeat,
            "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "command": f"python scripts/bench.py {name} --repeat {args.repeat}",
            "commit": code_version(),
            "load_before": before,
            "load_after": load(),
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, args.results.with_suffix(".md"))
    write_plot(results, args.results.with_suffix(".png"))
    print(f"wrote {args.results.with_suffix('.md')} and {args.results.with_suffix('.png')}")


if __name__ == "__main__":
    main()
