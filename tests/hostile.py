"""A corpus of broken and hostile inputs, each built from a healthy synthetic run in a fresh folder.

Every case is a `Hostile`: how to break the run (`build`), the exit code the command must give, and the words its
one-line error must contain (file, step, tensor). `run_case` runs `bema-average` on it through the real entry point
and reports what happened; the tests and `scripts/reliability_report.py` both use it, so the report's table shows
the messages users actually get.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from synthetic import make_run

from bema_offline.cli import _run, average_command

STEPS = [2, 4, 6, 8]
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


@dataclass(frozen=True)
class Built:
    args: list[str]  # command-line arguments, without --quiet
    needles: list[str]  # what the error line must contain
    output: Path  # where the output would go


@dataclass(frozen=True)
class Hostile:
    id: str
    what: str  # the broken input, in words
    build: Callable[[Path], Built]
    exit_code: int = 1


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stderr: str
    stdout: str
    tree_unchanged: bool  # nothing under the root was created, changed or removed
    leftovers: list[str]  # staging or lock files beside the output


# --- helpers --------------------------------------------------------------------------------------------------


def healthy_run(root: Path, *, shards: int = 1) -> tuple[Path, Path]:
    run_dir, base_dir, _ = make_run(root, STEPS, shards=shards)
    return run_dir, base_dir


def default_args(run_dir: Path, base_dir: Path) -> list[str]:
    return [str(run_dir), "--base-model", str(base_dir), "--update-freq", "2"]


def built(run_dir: Path, base_dir: Path, *needles, extra: tuple[str, ...] = ()) -> Built:
    return Built([*default_args(run_dir, base_dir), *extra], [str(n) for n in needles], run_dir / "bema-offline")


def raw_safetensors(path: Path, header: bytes | dict, data: bytes = b"", *, header_len: int | None = None) -> None:
    """Write a safetensors file byte by byte, however wrong."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)


def rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Every entry under `root`: file contents hashed, links by target, without following links or opening FIFOs."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            key = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                found[key] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = f"mode:{stat.S_IFMT(mode)}"
    return found


def run_cli(args: list[str], *, command=average_command) -> tuple[int, str, str]:
    """Run a command in-process as a user would; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _run(command, [str(a) for a in args], prog_name="bema-average")
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def run_case(case: Hostile, root: Path, *, quiet: bool = True) -> tuple[Built, Outcome]:
    """Build the case under `root`, run `bema-average` on it, and report what happened."""
    spec = case.build(root)
    before = tree_fingerprint(root)
    planted = set(spec.output.parent.glob(f".{spec.output.name}.bema-*"))  # a case may plant a lock-named link
    code, stdout, stderr = run_cli([*spec.args, *(["--quiet"] if quiet else [])])
    leftovers = sorted(p.name for p in set(spec.output.parent.glob(f".{spec.output.name}.bema-*")) - planted)
    return spec, Outcome(code, stderr, stdout, tree_fingerprint(root) == before, leftovers)


# --- broken safetensors files ----------------------------------------------------------------------------------


def _file_case(change: Callable[[Path], list[str]], *, step: int = 6) -> Callable[[Path], Built]:
    """A case that breaks `checkpoint-STEP/model.safetensors` with `change`, which returns extra needles."""

    def build(root: Path) -> Built:
        run_dir, base_dir = healthy_run(root)
        path = run_dir / f"checkpoint-{step}" / "model.safetensors"
        return built(run_dir, base_dir, path, *change(path))

    return build


def _truncate_data(path: Path) -> list[str]:
    path.write_bytes(path.read_bytes()[:-10])
    return ["truncated", "tensor"]


def _truncate_prefix(path: Path) -> list[str]:
    path.write_bytes(path.read_bytes()[:5])
    return ["truncated"]


def _empty_file(path: Path) -> list[str]:
    path.write_bytes(b"")
    return ["truncated", "0 bytes"]


def _header_past_end(path: Path) -> list[str]:
    header, data = header_of(path)
    raw_safetensors(path, header, data, header_len=10**6)
    return ["header length 1000000", "past the end"]


def _header_length_huge(path: Path) -> list[str]:
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + path.read_bytes()[8:])
    return ["header length", "past the end"]


def _malformed_json(path: Path) -> list[str]:
    raw_safetensors(path, b'{"model.norm.weight": {"dtype": "F32",', b"\0" * 64)
    return ["malformed safetensors header"]


def _not_utf8(path: Path) -> list[str]:
    raw_safetensors(path, b'{"\xff\xfe": 1}', b"\0" * 8)
    return ["malformed safetensors header", "utf-8"]


def _not_an_object(path: Path) -> list[str]:
    raw_safetensors(path, [1, 2, 3])
    return ["not a JSON object"]


def _deep_nesting(path: Path) -> list[str]:
    raw_safetensors(path, b"[" * 100_000 + b"]" * 100_000)
    return ["nested too deeply"]


def _huge_integer(path: Path) -> list[str]:
    raw_safetensors(path, b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4)
    return ["malformed safetensors header", "integer"]


def _edit_header(edit: Callable[[dict], list[str]]) -> Callable[[Path], list[str]]:
    def change(path: Path) -> list[str]:
        header, data = header_of(path)
        needles = edit(header)
        raw_safetensors(path, header, data)
        return needles

    return change


def _overlap(header: dict) -> list[str]:
    first, second = header[EMBED]["data_offsets"], header["model.layers.0.self_attn.q_proj.bias"]["data_offsets"]
    header["model.layers.0.self_attn.q_proj.bias"]["data_offsets"] = [first[0] + 4, first[0] + 4 + second[1] - second[0]]
    return ["overlap", EMBED]


def _out_of_range(header: dict) -> list[str]:
    entry = header[NORM]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [10**6, 10**6 + size]
    return [NORM, "truncated"]


def _reversed_offsets(header: dict) -> list[str]:
    start, stop = header[NORM]["data_offsets"]
    header[NORM]["data_offsets"] = [stop, start]
    return [NORM, "malformed data_offsets"]


def _unknown_dtype(header: dict) -> list[str]:
    header[NORM]["dtype"] = "F12"
    return [NORM, "unknown dtype 'F12'"]


def _dtype_not_a_string(header: dict) -> list[str]:
    header[NORM]["dtype"] = ["F32"]
    return [NORM, "unknown dtype"]


def _shape_bytes_mismatch(header: dict) -> list[str]:
    header[NORM]["shape"] = [9]
    return [NORM, "needs 36 bytes", "span 32"]


def _bad_shape(header: dict) -> list[str]:
    header[NORM]["shape"] = [-8]
    return [NORM, "malformed shape"]


def _metadata_not_object(header: dict) -> list[str]:
    header["__metadata__"] = ["format", "pt"]
    return ["__metadata__"]


def _no_tensors(path: Path) -> list[str]:
    raw_safetensors(path, {"__metadata__": {"format": "pt"}})
    return ["holds no tensors"]


# --- values and consistency across steps ------------------------------------------------------------------------


def _poison(value: float, step: int, where: str) -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        run_dir, base_dir = healthy_run(root)
        folder = base_dir if step == 0 else run_dir / f"checkpoint-{step}"

        def change(tensors):
            tensors["model.layers.0.mlp.up_proj.weight"][3, 1] = value

        rewrite(folder, change)
        return built(run_dir, base_dir, "model.layers.0.mlp.up_proj.weight", where, folder / "model.safetensors", "NaN or Inf")

    return build


def _across_steps(change: Callable[[dict], None], *needles: str, folder: str = "checkpoint-4") -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        run_dir, base_dir = healthy_run(root)
        target = base_dir if folder == "base" else run_dir / folder
        rewrite(target, change)
        return built(run_dir, base_dir, *needles, target)

    return build


def _resize_vocab(tensors: dict) -> None:
    tensors[EMBED] = torch.cat([tensors[EMBED], torch.zeros(2, 8)])


def _to_bf16(tensors: dict) -> None:
    for name in list(tensors):
        tensors[name] = tensors[name].to(torch.bfloat16)


# --- sharded checkpoints and their index ------------------------------------------------------------------------


def _index_case(edit: Callable[[Path], list[str]]) -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        run_dir, base_dir = healthy_run(root, shards=2)
        folder = run_dir / "checkpoint-4"
        return built(run_dir, base_dir, *edit(folder))

    return build


def _index_path(folder: Path) -> Path:
    return folder / "model.safetensors.index.json"


def _index_missing_shard(folder: Path) -> list[str]:
    (folder / "model-00002-of-00002.safetensors").unlink()
    return [_index_path(folder), "model-00002-of-00002.safetensors", "missing"]


def _index_malformed(folder: Path) -> list[str]:
    _index_path(folder).write_text('{"weight_map": {"a": ')
    return [_index_path(folder), "malformed index"]


def _index_without_weight_map(folder: Path) -> list[str]:
    _index_path(folder).write_text('{"metadata": {}}')
    return [_index_path(folder), "weight_map"]


def _index_path_escape(folder: Path) -> list[str]:
    index = json.loads(_index_path(folder).read_text())
    index["weight_map"][NORM] = "../checkpoint-2/model-00001-of-00002.safetensors"
    _index_path(folder).write_text(json.dumps(index))
    return [_index_path(folder), "not a file name"]


def _index_wrong_shard(folder: Path) -> list[str]:
    index = json.loads(_index_path(folder).read_text())
    shard = index["weight_map"][NORM]
    index["weight_map"][NORM] = next(v for v in index["weight_map"].values() if v != shard)
    _index_path(folder).write_text(json.dumps(index))
    return [_index_path(folder), NORM, "does not contain it"]


def _index_forgets_tensor(folder: Path) -> list[str]:
    index = json.loads(_index_path(folder).read_text())
    shard = index["weight_map"].pop(NORM)
    _index_path(folder).write_text(json.dumps(index))
    return [folder / shard, NORM, "not in the index"]


# --- folders and names ------------------------------------------------------------------------------------------


def _duplicate_steps(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    os.rename(run_dir / "checkpoint-8", run_dir / "checkpoint-08")
    (run_dir / "checkpoint-8").mkdir()
    return built(run_dir, base_dir, run_dir / "checkpoint-08", run_dir / "checkpoint-8", "both step 8")


def _named(name: str) -> Callable[[Path], Built]:
    def build(root: Path) -> Built:
        run_dir, base_dir = healthy_run(root)
        (run_dir / name).mkdir()
        return built(run_dir, base_dir, run_dir / name, "without a step number")

    return build


def _bin_only(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    folder = run_dir / "checkpoint-6"
    for path in folder.glob("*.safetensors"):
        path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return built(run_dir, base_dir, folder, ".bin", "save_safetensors=True")


def _link_loop_checkpoint(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    (run_dir / "checkpoint-10").symlink_to("checkpoint-10")
    return built(run_dir, base_dir, run_dir / "checkpoint-10", "link loop")


def _link_loop_weights(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    path = run_dir / "checkpoint-6" / "model.safetensors"
    path.unlink()
    path.symlink_to("model.safetensors")
    return built(run_dir, base_dir, path, "link loop")


def _link_loop_run(root: Path) -> Built:
    loop = root / "loop"
    loop.symlink_to("loop")
    return Built([str(loop), "--update-freq", "2"], [str(loop), "link loop"], loop / "bema-offline")


def _empty_run(root: Path) -> Built:
    (root / "empty").mkdir()
    return Built([str(root / "empty"), "--update-freq", "2"], [str(root / "empty"), "no checkpoint-N folders"], root / "empty" / "bema-offline")


def _empty_checkpoint(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    (run_dir / "checkpoint-10").mkdir()
    return Built(
        [str(run_dir), "--base-model", str(base_dir), "--update-freq", "2", "--max-step", "10"],
        [str(run_dir / "checkpoint-10"), "no model.safetensors"],
        run_dir / "bema-offline",
    )


def _checkpoint_is_a_file(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    (run_dir / "checkpoint-10").write_text("not a folder")
    return built(run_dir, base_dir, run_dir / "checkpoint-10", "not a folder")


def _weights_are_a_fifo(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    path = run_dir / "checkpoint-6" / "model.safetensors"
    path.unlink()
    os.mkfifo(path)
    return built(run_dir, base_dir, path, "not a regular file")


def _base_bin_only(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    (base_dir / "model.safetensors").unlink()
    (base_dir / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return built(run_dir, base_dir, base_dir, ".bin")


def _malformed_config_with_dtype(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    (run_dir / "checkpoint-8" / "config.json").write_text('{"hidden_size": 8,')
    return built(run_dir, base_dir, run_dir / "checkpoint-8" / "config.json", "malformed JSON", extra=("--dtype", "bfloat16"))


# --- where the output goes (usage errors, exit code 2) ----------------------------------------------------------


def _output_inside_checkpoint(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    output = run_dir / "checkpoint-4" / "avg"
    return Built([*default_args(run_dir, base_dir), "-o", str(output)], [str(output), "inside the input"], output)


def _output_is_the_run(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    return Built([*default_args(run_dir, base_dir), "-o", str(run_dir), "--overwrite"], [str(run_dir), "input"], run_dir)


def _output_link_loop(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    output = root / "out"
    output.symlink_to("out")
    return Built([*default_args(run_dir, base_dir), "-o", str(output)], [str(output), "link loop"], output)


def _lone_surrogate_name(header: dict) -> list[str]:
    header["\udc80bad"] = header.pop(NORM)
    return ["not valid UTF-8"]


def _shape_overflows(header: dict) -> list[str]:
    header[NORM]["shape"] = [0, 2**64]
    header[NORM]["data_offsets"] = [header[NORM]["data_offsets"][0]] * 2
    return [NORM, "too large for any loader"]


def _lock_is_a_link(root: Path, *, hard: bool) -> Built:
    run_dir, base_dir = healthy_run(root)
    target = run_dir / "checkpoint-8" / "model.safetensors"
    lock = run_dir / ".bema-offline.bema-lock"
    lock.hardlink_to(target) if hard else lock.symlink_to(target)
    return Built(default_args(run_dir, base_dir), [str(lock), "not a lock file"], run_dir / "bema-offline")


def _output_named_like_a_checkpoint(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    output = run_dir / "checkpoint-12"
    return Built([*default_args(run_dir, base_dir), "-o", str(output)], [str(output), "named like a checkpoint"], output)


def _output_is_an_ignored_checkpoint(root: Path) -> Built:
    run_dir, base_dir = healthy_run(root)
    output = run_dir / "checkpoint-8"  # outside --max-step 6: the plan ignores it, --overwrite would replace it
    args = [*default_args(run_dir, base_dir), "--max-step", "6", "-o", str(output), "--overwrite"]
    return Built(args, [str(output), "named like a checkpoint"], output)


def _input_linked_into_output(root: Path, *, hard: bool) -> Built:
    run_dir, base_dir = healthy_run(root)
    output = root / "out"
    output.mkdir()
    weights = base_dir / "model.safetensors"
    os.replace(weights, output / "model.safetensors")  # an earlier output, which the base now points into
    weights.hardlink_to(output / "model.safetensors") if hard else weights.symlink_to(output / "model.safetensors")
    args = [*default_args(run_dir, base_dir), "-o", str(output), "--overwrite"]
    return Built(args, [str(output / "model.safetensors"), str(weights), "would change the input"], output)


CASES: list[Hostile] = [
    Hostile("truncated-data", "a truncated file (the last tensor cut short)", _file_case(_truncate_data)),
    Hostile("truncated-prefix", "a file cut inside its 8-byte length prefix", _file_case(_truncate_prefix)),
    Hostile("empty-file", "an empty (0-byte) safetensors file", _file_case(_empty_file)),
    Hostile("header-past-eof", "a header length beyond the end of the file", _file_case(_header_past_end)),
    Hostile("header-length-2^64", "a header length of 2^64 - 1", _file_case(_header_length_huge)),
    Hostile("malformed-json", "malformed header JSON", _file_case(_malformed_json)),
    Hostile("header-not-utf8", "a header that is not UTF-8", _file_case(_not_utf8)),
    Hostile("header-not-object", "a header that is a JSON array", _file_case(_not_an_object)),
    Hostile("header-deep-nesting", "a header nested 100,000 levels deep", _file_case(_deep_nesting)),
    Hostile("header-huge-integer", "a 5,000-digit integer in a shape", _file_case(_huge_integer)),
    Hostile("overlapping-offsets", "overlapping data offsets", _file_case(_edit_header(_overlap))),
    Hostile("offsets-out-of-range", "data offsets beyond the end of the file", _file_case(_edit_header(_out_of_range))),
    Hostile("offsets-reversed", "data offsets end before they start", _file_case(_edit_header(_reversed_offsets))),
    Hostile("unknown-dtype", "an unknown dtype", _file_case(_edit_header(_unknown_dtype))),
    Hostile("dtype-not-a-string", "a dtype that is a list", _file_case(_edit_header(_dtype_not_a_string))),
    Hostile("shape-vs-bytes", "a shape that does not match the byte count", _file_case(_edit_header(_shape_bytes_mismatch))),
    Hostile("negative-shape", "a negative dimension", _file_case(_edit_header(_bad_shape))),
    Hostile("metadata-not-object", "`__metadata__` that is not an object", _file_case(_edit_header(_metadata_not_object))),
    Hostile("no-tensors", "a checkpoint whose file holds no tensors", _file_case(_no_tensors)),
    Hostile("nan-in-checkpoint", "NaN values in a checkpoint", _poison(float("nan"), 6, "step 6")),
    Hostile("inf-in-checkpoint", "Inf values in a checkpoint", _poison(float("inf"), 4, "step 4")),
    Hostile("nan-in-base", "NaN values in the base model", _poison(float("nan"), 0, "base model")),
    Hostile("missing-tensor", "a tensor missing from one step", _across_steps(lambda t: t.pop(NORM), NORM, "missing from step 4")),
    Hostile("extra-tensor", "an extra tensor in one step", _across_steps(lambda t: t.update(extra=torch.zeros(2)), "'extra'", "step 4")),
    Hostile("base-missing-tensor", "a tensor missing from the base model", _across_steps(lambda t: t.pop(NORM), NORM, "base model", folder="base")),
    Hostile("vocab-resize", "a shape change between steps (vocab resize)", _across_steps(_resize_vocab, EMBED, "[52, 8]", "resized", folder="checkpoint-6")),
    Hostile("base-vocab-resize", "a base model with a smaller vocabulary", _across_steps(lambda t: t.update({EMBED: t[EMBED][:48]}), EMBED, "[48, 8]", "--update-after", folder="base")),
    Hostile("mixed-dtypes", "mixed dtypes across steps", _across_steps(_to_bf16, "BF16", "F32", "step 4")),
    Hostile("index-missing-shard", "an index that names a missing shard", _index_case(_index_missing_shard)),
    Hostile("index-malformed", "a malformed index JSON", _index_case(_index_malformed)),
    Hostile("index-no-weight-map", "an index without weight_map", _index_case(_index_without_weight_map)),
    Hostile("index-path-escape", "an index naming a shard outside its folder (../)", _index_case(_index_path_escape)),
    Hostile("index-wrong-shard", "an index mapping a tensor to a shard that lacks it", _index_case(_index_wrong_shard)),
    Hostile("index-forgets-tensor", "a shard holding a tensor the index omits", _index_case(_index_forgets_tensor)),
    Hostile("duplicate-steps", "duplicate steps (checkpoint-8 and checkpoint-08)", _duplicate_steps),
    Hostile("non-numeric-name", "a non-numeric name (checkpoint-foo)", _named("checkpoint-foo")),
    Hostile("unicode-digit-name", "a non-ASCII digit (checkpoint-²)", _named("checkpoint-²")),
    Hostile("empty-step-name", "a name with no step (checkpoint-)", _named("checkpoint-")),
    Hostile("bin-only", "a folder with only .bin files", _bin_only),
    Hostile("base-bin-only", "a base model with only .bin files", _base_bin_only),
    Hostile("link-loop-checkpoint", "a symlink loop (checkpoint-10 -> itself)", _link_loop_checkpoint),
    Hostile("link-loop-weights", "a symlink loop (model.safetensors -> itself)", _link_loop_weights),
    Hostile("link-loop-run", "a symlink loop as the run folder", _link_loop_run),
    Hostile("empty-run", "an empty folder", _empty_run),
    Hostile("empty-checkpoint", "an empty checkpoint folder", _empty_checkpoint),
    Hostile("checkpoint-is-a-file", "a checkpoint-N that is a file", _checkpoint_is_a_file),
    Hostile("weights-are-a-fifo", "a named pipe as model.safetensors", _weights_are_a_fifo),
    Hostile("malformed-config", "a malformed config.json (with --dtype, which edits it)", _malformed_config_with_dtype),
    Hostile("output-inside-checkpoint", "--output inside a checkpoint folder", _output_inside_checkpoint, exit_code=2),
    Hostile("output-is-the-run", "--output is the run folder (with --overwrite)", _output_is_the_run, exit_code=2),
    Hostile("output-link-loop", "--output is a symlink loop", _output_link_loop, exit_code=2),
    # the second round (issue 10): outputs and locks that could write into an input, headers no loader reads
    Hostile("header-lone-surrogate", "a tensor name with a lone surrogate", _file_case(_edit_header(_lone_surrogate_name))),
    Hostile("header-shape-overflow", "a shape [0, 2^64] (no bytes, but no loader can hold it)", _file_case(_edit_header(_shape_overflows))),
    Hostile("lock-is-a-link", "the lock's name is a symlink to a checkpoint", lambda root: _lock_is_a_link(root, hard=False), exit_code=2),
    Hostile("lock-is-a-hard-link", "the lock's name is a hard link to a checkpoint", lambda root: _lock_is_a_link(root, hard=True), exit_code=2),
    Hostile("output-named-like-a-checkpoint", "--output RUN/checkpoint-12 (the next run would read it)", _output_named_like_a_checkpoint, exit_code=2),
    Hostile("output-is-an-ignored-checkpoint", "--output RUN/checkpoint-8 --overwrite, outside --max-step", _output_is_an_ignored_checkpoint, exit_code=2),
    Hostile("input-symlinked-into-output", "the base's weights link into the output (--overwrite)", lambda root: _input_linked_into_output(root, hard=False), exit_code=2),
    Hostile("input-hard-linked-into-output", "the base's weights are a hard link into the output (--overwrite)", lambda root: _input_linked_into_output(root, hard=True), exit_code=2),
]
