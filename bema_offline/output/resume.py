"""`--resume`: finish an interrupted run by reusing the output shards it completed, when its plan is the same.

A run keeps two small files in its staging folder `.NAME.bema-partial`:

- `.bema-plan.json`: the plan's fingerprint and its hash. The fingerprint holds everything the output bytes
  depend on: the tool version, the schedules, the outputs, the dtypes and shard size, the tensor layout (each
  source's as a digest: tens of thousands of tensors per checkpoint cost one hash, not a JSON tree), and every
  input file with its size and modification time.
- `.bema-done`: one line `RELPATH/SHARD` per finished shard, appended after the shard was flushed to disk.

The engine finishes shards in order (it processes tensors in the order the shards hold them). With `--resume`, a
staging folder whose hash matches is kept; the shards finished in every output folder, whose size and header
are as planned, are left as they are, and only the tensors of the other shards are computed again. Elementwise
arithmetic gives the same bits on any slicing, so the result is byte-identical to an uninterrupted run's.
`--max-memory` is not part of the plan: a run can resume with another budget.

Both files are removed just before the output is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from ..engine.plan import Plan
from ..errors import DataError
from ..files import read_json_file, read_small_file, write_new_file
from ..sources.tensors import WeightSource
from .publish import fresh_staging, remove_path, staging_path, state_path, trash_path
from .writer import ShardLayout

PLAN_FILE = ".bema-plan.json"
DONE_FILE = ".bema-done"
PLAN_SETTINGS = ("accum_dtype", "dtype", "max_shard_size")  # the settings the output bytes depend on


def plan_fingerprint(plan: Plan, settings: dict) -> dict:
    """Everything an output's bytes depend on, as plain JSON data."""
    return {
        "tool": f"bema-offline {__version__}",
        "schedules": [{"name": r.name, **r.schedule.to_dict(), "update_steps": r.update_steps} for r in plan.schedules],
        "outputs": [
            {"relpath": o.relpath, "kind": o.kind, "step": o.step, "schedule": o.schedule_index, "weights": sorted(o.weights.items())}
            for o in plan.outputs
        ],
        "settings": {key: settings.get(key) for key in PLAN_SETTINGS},
        "tensors": [[info.name, plan.output_dtypes[info.name], list(info.shape)] for info in plan.tensors],
        "inputs": [
            {
                "step": step,
                "folder": str(source.folder.resolve()),
                "files": [[path.name, identity.size, identity.mtime_ns] for path, identity in sorted(source.identities.items())],
                "tensors": layout_digest(source),
            }
            for step, source in sorted(plan.sources.items())
        ],
    }


def layout_digest(source: WeightSource) -> str:
    """The sha256 of where a source's tensors lie: each tensor's name, dtype, shape, and extents (file name, byte
    offset, elements), in order. One pass, and no structure per tensor: a source of 20,000 tensors costs milliseconds."""
    names = {path: path.name for path in source.identities}
    lines = []
    for t in source.tensors.values():
        extents = [f"{names.get(e.path) or e.path.name}:{e.offset}:{e.first}:{e.stop}" for e in t.extents]
        lines.append(f"{t.name}\0{t.dtype}\0{t.shape}\0" + "\0".join(extents))
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint_hash(fingerprint: object) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


@dataclass
class Staging:
    """The staging folder of a run, with what an interrupted run with the same plan finished in it."""

    path: Path
    plan_hash: str
    finished: set[str] = field(default_factory=set)  # RELPATH/SHARD, as recorded in DONE_FILE
    removed_leftovers: bool = False
    note: str | None = None  # why leftovers could not be resumed from

    def record_done(self, shard: Path) -> None:
        """Record a finished (already flushed) shard, durably, for a later `--resume`."""
        line = shard.relative_to(self.path).as_posix() + "\n"
        path = self.path / DONE_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DataError(f"{path}: cannot record a finished shard ({e.strerror or e}); remove {self.path} and rerun") from e
        try:
            if not _is_own_file(os.fstat(fd)):
                raise DataError(f"{path}: not the journal this tool writes (a hard link?); remove {self.path} and rerun")
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def reusable_shards(self, relpaths: list[str], layout: list[ShardLayout]) -> set[str]:
        """The shards finished in every output folder whose file has exactly the planned size and header."""
        reusable = set()
        for shard in layout:
            paths = [self.path / relpath / shard.name for relpath in relpaths]
            if all(_is_finished_shard(path, shard, path.relative_to(self.path).as_posix() in self.finished) for path in paths):
                reusable.add(shard.name)
        return reusable

    def remove_resume_files(self) -> None:
        for name in (PLAN_FILE, DONE_FILE):
            (self.path / name).unlink(missing_ok=True)


def _is_own_file(status: os.stat_result) -> bool:
    """A regular file with no other name: what this tool creates in its staging folder (a link or a hard link to
    some other file is never written to, nor reused as a shard)."""
    return stat.S_ISREG(status.st_mode) and status.st_nlink == 1


def _holds_links(folder: Path) -> bool:
    """Whether anything under `folder` is a link (a resumed run writes into its subfolders: never through a link)."""
    for current, dirs, files in os.walk(folder):
        if any(os.path.islink(os.path.join(current, name)) for name in dirs + files):
            return True
    return False


def _is_own_path(path: Path) -> bool:
    """Nothing at `path`, or a file of this tool's (see `_is_own_file`)."""
    try:
        return _is_own_file(os.lstat(path))
    except FileNotFoundError:
        return True


def _is_finished_shard(path: Path, shard: ShardLayout, recorded: bool) -> bool:
    if not recorded:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        status = os.fstat(fd)
        if not _is_own_file(status) or status.st_size != shard.file_size:
            return False
        return os.pread(fd, len(shard.header), 0) == shard.header
    finally:
        os.close(fd)


def prepare_staging(output: Path, fingerprint: dict, *, resume: bool) -> Staging:
    """The run's staging folder: the interrupted run's, kept when resuming with the same plan, else a fresh one.

    Call it while holding the output lock. Leftovers of an interrupted run that cannot be reused are removed
    (`removed_leftovers`); `note` says why they could not be reused.
    """
    plan_hash = fingerprint_hash(fingerprint)
    path = staging_path(output)
    trash = trash_path(output)
    removed_trash = os.path.lexists(trash)
    if removed_trash and not os.path.lexists(output) and not trash.is_symlink():
        # killed between the two renames of a publish without an atomic exchange: the old output goes back
        os.rename(trash, output)
    elif removed_trash:  # the old output that an interrupted --overwrite had moved aside, replaced since
        remove_path(trash)
    state = state_path(output)  # the state of a killed --no-keep-downloads run, which cannot be resumed
    removed_state = os.path.lexists(state)
    if removed_state:
        remove_path(state)
    removed_trash = removed_trash or removed_state
    if resume and path.is_dir() and not path.is_symlink():
        previous = _read_plan(path)
        if _holds_links(path):
            note = f"the leftovers at {path} hold links, where this tool keeps its own files and folders; started over"
        elif not all(_is_own_path(path / name) for name in (PLAN_FILE, DONE_FILE)):
            note = f"the leftovers at {path} hold links where this tool keeps its own files; started over"
        elif previous is not None and previous.get("plan_hash") == plan_hash:
            return Staging(path, plan_hash, _read_done(path), removed_leftovers=removed_trash)
        else:
            note = (
                f"the leftovers at {path} are not from the same plan ({_what_changed(previous, fingerprint)}); started over"
            )
    else:
        note = f"no interrupted run to resume at {path}; started from scratch" if resume else None
    path, removed = fresh_staging(output)
    _write_plan(path, plan_hash, fingerprint)
    return Staging(path, plan_hash, removed_leftovers=removed or removed_trash, note=note)


def _read_plan(staging: Path) -> dict | None:
    try:
        record = read_json_file(staging / PLAN_FILE, what="resume plan", hint="ignored", limit=2**20)
    except DataError:
        return None
    return record if isinstance(record, dict) else None


def _read_done(staging: Path) -> set[str]:
    try:
        text = read_small_file(staging / DONE_FILE, what="resume journal", limit=64 * 2**20).decode(errors="replace")
    except DataError:
        return set()
    return {line for line in text.split("\n") if line}  # a torn last line names no real shard and is ignored


def _write_plan(staging: Path, plan_hash: str, fingerprint: dict) -> None:
    """The hash, and a hash of each part of the fingerprint, to say what changed (the file stays small)."""
    parts = {key: fingerprint_hash(value) for key, value in fingerprint.items()}
    path = staging / PLAN_FILE
    try:
        write_new_file(path, json.dumps({"plan_hash": plan_hash, "parts": parts}, indent=1).encode(), fsync=True)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror or e}); free some disk space or choose another --output") from e


def _what_changed(previous: dict | None, fingerprint: dict) -> str:
    old = previous.get("parts") if previous else None
    if not isinstance(old, dict):
        return "no plan recorded"
    changed = [key for key, value in fingerprint.items() if old.get(key) != fingerprint_hash(value)]
    return f"{', '.join(changed)} changed" if changed else "plan hash differs"
