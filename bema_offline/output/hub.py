"""Push bema-offline output folders to the Hugging Face Hub.

An output folder (one with `bema_offline.json` and safetensors weights, or a PEFT adapter: `--lora-output adapter`)
becomes one repo, or one branch of a repo. A run with several outputs (`--every-update`, `--save ema,bema`, several schedules) pushes each of them:

- `repos` layout: one repo per output, `ORG/NAME-<subfolder with / replaced by ->`, e.g. `ORG/NAME-step-800`;
- `branches` layout: one repo `ORG/NAME` with a branch per output, e.g. `step-800`, and an index card on main.

Everything that can fail without uploading runs first: the folders are checked (`verify.check_output_folder`, the
headers and file sizes, and the tensor count against the record), the repo ids and branch names are validated, the token is looked up, the upload folders are prepared, and every repo and branch is created
(or found), before the first file goes up.

The local output folder is never modified. Each output goes up from an upload folder beside it
(`.NAME.bema-push-XXXX`, removed afterwards) that holds hard links to its files (copies where a link cannot be
made), the model card rendered again for its repo (its load snippet names the repo) with its chart, and a copy of
`bema_offline.json` without local paths (`redacted_record`): folders inside the run become relative to it
(`checkpoint-400`), other paths their last name. The local record keeps the absolute paths that `verify
--recompute` needs. The ranking that `--select-by` leaves in `best/` (`eval.json`, `eval.md`) goes up redacted the
same way, and a config's `_name_or_path` as its last name; any other file that still names the home folder or the
run's folders (a tokenizer config from older transformers, say) goes up as it is, with a note saying so. An adapter's
`adapter_config.json` names its base model by its Hub id when the record knows one, else by its folder's name (peft
reads `base_model_name_or_path` to find the base), and the record uploaded gives that file's new sha256.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from .._version import __version__
from ..errors import BemaError, DataError, UsageError, first_line
from ..files import SMALL_FILE_LIMIT, parse_json, read_json_file, read_small_file, write_new_file
from ..sources.peft import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, is_adapter_folder
from ..sources.run import INDEX_FILE, SIDECAR_FILES, SINGLE_FILE
from .card import CARD_FILE, PROVENANCE_FILE, PROVENANCE_LIMIT, card_metadata, write_card
from .chart import CHART_SVG
from .verify import check_output_folder, file_sha256

if TYPE_CHECKING:  # imported when used, not at startup
    from huggingface_hub import HfApi

LAYOUTS = ("repos", "branches")
# Weight files already in the repo (or the branch) that the upload does not replace are deleted in the same commit,
# so that a repo never mixes the new weights with stale shards of an earlier push (nor a model with a stale adapter
# config, which loaders would take for an adapter).
DELETE_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", ADAPTER_CONFIG, "effective_weights.png", "effective_weights.svg",
]
# An adapter's upload also deletes a model's configs left by an earlier push of a merged model.
ADAPTER_DELETE_PATTERNS = [*DELETE_PATTERNS, "config.json", "generation_config.json"]
_REPO_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What the upload folder holds instead of a link: the files rendered again for the Hub (and the PNG chart of older
# versions, which the new card does not show).
RENDERED_FILES = (CARD_FILE, CHART_SVG, "effective_weights.png", PROVENANCE_FILE)
# Keys of JSON sidecar files (older transformers wrote them) that hold the local folder a model was loaded from;
# loaders ignore them. A local path there goes up as its last name.
NAME_OR_PATH_KEYS = ("_name_or_path", "name_or_path")
REDACTED = "local paths: folders inside the run relative to it, other paths by their last name"
# What bema-offline eval writes into best/ of a --select-by sweep besides the record: the ranking and its Markdown
# name every candidate's folder, the data file and the DPO reference; they go up redacted as the record is.
EVAL_JSON, EVAL_MARKDOWN = "eval.json", "eval.md"
BINARY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".png")  # not searched for local paths


class HubError(BemaError):
    """The Hub refused or failed something: no token, a repo that cannot be created, a failed upload."""

    exit_code = 1


@dataclass(frozen=True)
class PushTarget:
    """Where one output folder goes.

    Args:
        folder (`Path`): the output folder.
        relpath (`str`): its place under the pushed folder ("" for the folder itself).
        repo_id (`str`): the Hub repo.
        revision (`str`, *optional*): the branch; None is the repo's main branch.
    """

    folder: Path
    relpath: str
    repo_id: str
    revision: str | None

    @property
    def where(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def get_token() -> str | None:
    """The saved Hugging Face token (`HF_TOKEN`, or `hf auth login`), found as huggingface_hub finds it."""
    from huggingface_hub import get_token as saved_token

    return saved_token()


def make_api(token: str) -> HfApi:
    """The `HfApi` that `push_to_hub` uses unless it is given one (tests replace this function)."""
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="bema-offline", library_version=__version__)


def find_outputs(output_dir: str | Path) -> list[tuple[str, Path]]:
    """The bema-offline outputs in `output_dir`: the folder itself, or its subfolders for a multi-output run.

    Returns:
        `list[tuple[str, Path]]`: `(relpath, folder)` pairs ordered by config, kind and step.

    Raises:
        `DataError`: the folder is not a bema-offline output, or an output in it lacks its weights or fails the light
            check (`verify.check_output_folder`: headers, file sizes, tensor count).
    """
    root = Path(output_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass a folder written by bema-average")
    if (root / PROVENANCE_FILE).is_file():
        folders = [root]
    else:
        folders = sorted(path.parent for path in root.rglob(PROVENANCE_FILE) if not _hidden(path.relative_to(root)))
    if not folders:
        raise DataError(f"{root}: not a bema-offline output (no {PROVENANCE_FILE}); pass a folder written by bema-average")
    outputs = []
    for folder in folders:
        record = read_record(folder)
        if not any((folder / name).is_file() for name in (SINGLE_FILE, INDEX_FILE, ADAPTER_SAFETENSORS)):
            raise DataError(
                f"{folder}: has {PROVENANCE_FILE} but no {SINGLE_FILE}, {INDEX_FILE} or {ADAPTER_SAFETENSORS}; the output is incomplete"
            )
        tensors = check_output_folder(folder)
        if record.get("tensors") != len(tensors):
            raise DataError(
                f"{folder / PROVENANCE_FILE}: records {record.get('tensors')} tensors but the folder holds {len(tensors)}; "
                "check it with `bema-offline verify`"
            )
        relpath = folder.relative_to(root).as_posix()
        outputs.append(((record.get("config") or "", record.get("kind", ""), record.get("step", 0)), relpath, folder))
    return [(relpath, folder) for _, relpath, folder in sorted(outputs, key=lambda item: item[0])]


def read_record(folder: Path) -> dict:
    path = folder / PROVENANCE_FILE
    record = read_json_file(path, what="provenance record", hint="re-run bema-average for this output", limit=PROVENANCE_LIMIT)
    if not isinstance(record, dict) or "effective_weights" not in record:
        raise DataError(f"{path}: not a bema-offline provenance record; re-run bema-average for this output")
    return record


def _hidden(relpath: Path) -> bool:
    return any(part.startswith(".") for part in relpath.parts)


def push_targets(
    relpaths: list[str], repo_id: str, *, layout: str = "repos", revision: str | None = None
) -> list[tuple[str, str | None]]:
    """Each output's `(repo_id, revision)`, in the order of `relpaths`, validated; nothing touches the network.

    Args:
        relpaths (`list[str]`): the outputs' subfolders ("" for a single output folder).
        repo_id (`str`): ORG/NAME.
        layout (`str`, defaults to "repos"): "repos" or "branches".
        revision (`str`, *optional*): the branch to push to (every repo's, with the repos layout).

    Raises:
        `UsageError`: a bad repo id, layout or branch name.
    """
    check_repo_id(repo_id)
    revision = None if revision in (None, "main") else revision
    if layout not in LAYOUTS:
        raise UsageError(f"--push-layout must be repos or branches, got {layout!r}")
    if revision is not None:
        _check_branch(revision, option="--revision")
    if len(relpaths) <= 1:
        return [(repo_id, revision)]
    if layout == "branches":
        if revision is not None:
            raise UsageError(
                f"--revision {revision}: with --push-layout branches each of the {len(relpaths)} outputs gets its own "
                "branch; leave --revision out, or push with --push-layout repos"
            )
        targets = [(repo_id, _slug(relpath)) for relpath in relpaths]
        for _, branch in targets:
            _check_branch(branch, option="the output")
        return targets
    targets = [(f"{repo_id}-{_slug(relpath)}", revision) for relpath in relpaths]
    for target, _ in targets:
        check_repo_id(target, derived=True)
    return targets


def _slug(relpath: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^\w.-]", "-", relpath.replace("/", "-"))).strip("-.")


def check_repo_id(repo_id: str, *, derived: bool = False) -> None:
    """A Hub model repo id: ORG/NAME, letters, digits, `-`, `_`, `.`, at most 96 characters, no `--` or `..`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    what = f"derived repo id {repo_id!r} (ORG/NAME-<output>)" if derived else f"--push-to-hub {repo_id!r}"
    if not _REPO_NAME.fullmatch(repo_id):
        raise UsageError(f"{what}: not a Hub repo id; write it as ORG/NAME (your user name or an organisation)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        first = str(e).strip().splitlines()[0]
        hint = "; choose a shorter NAME or use --push-layout branches" if derived else ""
        raise UsageError(f"{what}: {first}{hint}") from None


def _check_branch(branch: str, *, option: str) -> None:
    bad = (
        not branch
        or branch.startswith(("-", "/", "."))
        or branch.endswith(("/", ".", ".lock"))
        or ".." in branch
        or "//" in branch
        or re.search(r"[\s~^:?*\[\\]|@\{", branch)
    )
    if bad:
        raise UsageError(f"{option}: {branch!r} is not a valid branch name")


def find_token(token: str | None = None) -> str:
    """The Hub token: the one given, else HF_TOKEN, else the login cache (`hf auth login`).

    Raises:
        `HubError`: no token anywhere.
    """
    token = token or get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access); nothing was pushed"
        )
    return token


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    layout: str = "repos",
    token: str | None = None,
    api: HfApi | None = None,
    log: Callable[[str], None] | None = None,
) -> list[PushTarget]:
    """Push a bema-offline output folder (or each output of a multi-output run) to the Hub.

    Args:
        output_dir (`str | Path`): a folder written by `average()` / `bema-average`.
        repo_id (`str`): ORG/NAME. With several outputs and the repos layout, each output gets `ORG/NAME-<output>`.
        private (`bool`, defaults to False): create the repos private; an existing public repo is refused.
        revision (`str`, *optional*): push to this branch (created from main if missing).
        commit_message (`str`, *optional*): defaults to one naming the output.
        layout (`str`, defaults to "repos"): "repos" or "branches", for runs with several outputs.
        token (`str`, *optional*): defaults to HF_TOKEN or the login cache.
        api (`HfApi`, *optional*): the client to use; defaults to `make_api(token)`.
        log (`Callable[[str], None]`, *optional*): receives one line per repo and upload.

    Returns:
        `list[PushTarget]`: what went where.

    Raises:
        `DataError`: not a bema-offline output. `UsageError`: bad names. `HubError`: no token, a repo that cannot
        be created or accessed, a public repo with `private`, or a failed upload (the message says what was pushed).

    Example:

    ```python
    >>> push_to_hub("runs/dpo-bema", "my-org/qwen-dpo-bema", private=True)
    [PushTarget(folder=PosixPath('runs/dpo-bema'), relpath='', repo_id='my-org/qwen-dpo-bema', revision=None)]
    ```
    """
    log = log or (lambda line: None)
    outputs = find_outputs(output_dir)
    names = push_targets([relpath for relpath, _ in outputs], repo_id, layout=layout, revision=revision)
    targets = [PushTarget(folder, relpath, repo, branch) for (relpath, folder), (repo, branch) in zip(outputs, names)]
    token = find_token(token)
    api = api if api is not None else make_api(token)

    with upload_folders(output_dir) as staging:
        # each output's upload folder mirrors its place in the output (a single output's: its own name)
        places = [target.relpath if target.relpath not in ("", ".") else target.folder.name for target in targets]
        uploads = [stage_upload(target, staging / place) for target, place in zip(targets, places)]
        for repo in dict.fromkeys(t.repo_id for t in targets):
            _prepare_repo(api, repo, private=private)
        for target in targets:
            if target.revision:
                _hub_call(
                    lambda: api.create_branch(target.repo_id, branch=target.revision, repo_type="model", exist_ok=True),
                    f"cannot create branch {target.revision!r} in {target.repo_id}",
                )
        pushed: list[PushTarget] = []
        for target, upload in zip(targets, uploads):
            for note in local_paths_left(upload, local_places(target.folder)):
                log(f"{note} (to {target.where})")
            record = read_record(upload)
            message = commit_message or f"bema-offline: {record['kind'].upper()} of {record['run_dir']} at step {record['step']}"
            try:
                info = api.upload_folder(
                    repo_id=target.repo_id,
                    folder_path=str(upload),
                    repo_type="model",
                    revision=target.revision,
                    commit_message=message,
                    delete_patterns=ADAPTER_DELETE_PATTERNS if is_adapter_folder(upload) else DELETE_PATTERNS,
                )
            except Exception as e:
                done = ", ".join(t.where for t in pushed) or "nothing"
                raise HubError(
                    f"uploading {target.folder} to {target.where} failed ({first_line(e)}); pushed so far: {done}; "
                    "run `bema-offline push` again to retry"
                ) from e
            pushed.append(target)
            log(f"pushed {target.folder} to {target.where}" + (f" ({info.commit_url})" if getattr(info, "commit_url", None) else ""))

    if layout == "branches" and len(targets) > 1:
        _hub_call(
            lambda: api.upload_file(
                path_or_fileobj=branches_index(targets).encode(),
                path_in_repo=CARD_FILE,
                repo_id=repo_id,
                repo_type="model",
                commit_message=commit_message or "bema-offline: index of the averaged models' branches",
            ),
            f"writing the index card on the main branch of {repo_id} failed",
            then="every output was pushed to its branch; only the index card is missing",
        )
        log(f"wrote the index of {len(targets)} branches to {repo_id}")
    return targets


@contextmanager
def upload_folders(output_dir: str | Path) -> Iterator[Path]:
    """A new private folder beside the output, `.NAME.bema-push-XXXX` (hard links need the same file system), for
    the upload folders; removed with everything in it when the block ends, however it ends."""
    output = Path(output_dir).resolve()
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.bema-push-", dir=output.parent))
    except OSError as e:
        raise DataError(
            f"{output.parent}: cannot make the upload folder there ({e.strerror or e}); it holds links to the output's "
            "files, so that the output itself is never changed: push from a writable place; nothing was pushed"
        ) from e
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage_upload(target: PushTarget, upload: Path) -> Path:
    """Make the folder that goes up for one output: hard links to its files (copies where linking fails), the
    provenance record without local paths, JSON sidecars without the local folder they were loaded from, and the
    card rendered for the repo, with its chart. The output folder is only read.

    Args:
        target (`PushTarget`): the output and where it goes.
        upload (`Path`): the folder to make (it must not exist; its parent is made if needed).

    Returns:
        `Path`: `upload`.
    """
    try:
        local = read_record(target.folder)
        record, run_dir = redacted_record(local), Path(local.get("run_dir") or "")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{target.folder / PROVENANCE_FILE}: malformed provenance record ({e}); re-run bema-average for this output") from e
    try:
        upload.parent.mkdir(parents=True, exist_ok=True)
        _link_tree(target.folder, upload, skip=RENDERED_FILES)
        record = _redact_adapter_config(upload, record)
        write_new_file(upload / PROVENANCE_FILE, (json.dumps(record, indent=2) + "\n").encode())
        for name in [name for name in SIDECAR_FILES if name.endswith(".json")]:
            _rewrite_json(target.folder / name, upload / name, _without_local_name_or_path)
        _rewrite_json(target.folder / EVAL_JSON, upload / EVAL_JSON, lambda content: redacted_paths(content, run_dir))
        if (target.folder / EVAL_MARKDOWN).is_file():
            text = read_small_file(target.folder / EVAL_MARKDOWN, what="leaderboard").decode("utf-8", errors="replace")
            _replace(upload / EVAL_MARKDOWN, redacted_paths(text, run_dir).encode())
        write_card(upload, record, repo_id=target.repo_id, revision=target.revision)
    except OSError as e:
        raise DataError(f"{e.filename or upload}: cannot prepare the upload of {target.folder} ({e.strerror or e}); nothing was pushed") from e
    return upload


def _redact_adapter_config(upload: Path, record: dict) -> dict:
    """An adapter's `adapter_config.json` in the upload folder with its base model as a Hub id (the record's, when it
    knows one) or the local folder's name instead of a local path; returns the record, its `output_files` giving
    the new file's size and sha256 (so that `verify` still checks a downloaded copy). Anything else is left alone."""
    path = upload / ADAPTER_CONFIG
    if not path.is_file():
        return record
    try:
        config = parse_json(read_small_file(path, what="adapter config"), what=f"{path}: malformed adapter config", hint="fix it")
    except DataError:
        return record
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not _is_local_path(base):
        return record
    shown = record.get("base_model_id") or _shown_path(base, None)
    _replace(path, (json.dumps({**config, "base_model_name_or_path": shown}, indent=2, sort_keys=True) + "\n").encode())
    entry = {"name": ADAPTER_CONFIG, "size": path.stat().st_size, "sha256": file_sha256(path)}
    files = record.get("output_files")
    if isinstance(files, list):
        record = {**record, "output_files": [entry if isinstance(e, dict) and e.get("name") == ADAPTER_CONFIG else e for e in files]}
    return record


def _rewrite_json(source: Path, upload: Path, change: Callable[[object], object]) -> None:
    """Put `change(content)` of a JSON file of the output in place of its link in the upload folder, where it differs;
    a file that is missing or does not parse is left alone."""
    if not source.is_file():
        return
    try:
        content = parse_json(read_small_file(source, what="JSON file"), what=f"{source}: malformed JSON", hint="fix it")
    except DataError:
        return
    changed = change(content)
    if changed != content:
        _replace(upload, (json.dumps(changed, indent=2) + "\n").encode())


def _replace(upload: Path, data: bytes) -> None:
    """Replace a file of the upload folder (a hard link: only this name goes; the output's file is untouched)."""
    upload.unlink()
    write_new_file(upload, data)


def _link_tree(source: Path, into: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Mirror the regular files of `source` (and its subfolders) into the new folder `into` as hard links, or copies
    where the file system cannot link; links to files are followed, other entries (FIFOs, links to folders) left out."""
    into.mkdir()
    for entry in os.scandir(source):
        if entry.name in skip:
            continue
        target = into / entry.name
        if entry.is_dir(follow_symlinks=False):
            _link_tree(Path(entry.path), target)
        elif entry.is_file():
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copyfile(entry.path, target)


def redacted_record(record: dict) -> dict:
    """The provenance record as it goes to the Hub: no absolute local path, no home folder, no user name.

    The run folder becomes its name; input folders inside the run become relative to it (`checkpoint-400`); the base
    model stays a Hub repo id when it is one, else becomes its folder's name; any other local path anywhere in the
    record (a selection's sources, say) becomes relative to the run or its last name (`redacted_paths`). Everything
    else (parameters, weights, file names, sizes and sha256) is kept, so that `verify` still checks a downloaded
    copy's files.
    """
    run_dir = Path(record.get("run_dir") or ".")
    base_model = record.get("base_model")
    if base_model is not None and base_model != record.get("base_model_id"):
        base_model = Path(base_model).name  # a local folder (a Hub id is recorded as base_model_id too)
    inputs = []
    for entry in record.get("inputs") or []:
        folder = Path(entry["folder"])
        if entry.get("step") == 0 and base_model is not None and not folder.is_relative_to(run_dir):
            inputs.append({**entry, "folder": base_model})
        else:
            inputs.append({**entry, "folder": _shown_path(str(folder), run_dir)})
    redacted = {**record, "run_dir": run_dir.name, "base_model": base_model, "inputs": inputs, "redacted": REDACTED}
    return redacted_paths(redacted, run_dir)


# An absolute path, POSIX, from the home folder, or Windows, standing alone or inside a text (not inside a URL).
_LOCAL_PATH = re.compile(r"(?<![\w.:/~-])(?:~?/|[A-Za-z]:[\\/])[^\s\"'`|,;()<>\[\]{}]+")


def redacted_paths(value: object, run_dir: Path | None = None) -> object:
    """A JSON value with every local path in its strings (whole, or inside a text) replaced: relative to `run_dir`
    when inside it, else by its last name."""
    if isinstance(value, dict):
        return {key: redacted_paths(item, run_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [redacted_paths(item, run_dir) for item in value]
    if isinstance(value, str):
        return _LOCAL_PATH.sub(lambda match: _shown_path(match.group(0), run_dir), value)
    return value


def _shown_path(path: str, run_dir: Path | None) -> str:
    local = PureWindowsPath(path) if re.match(r"[A-Za-z]:", path) else PurePosixPath(path)
    if run_dir is not None and run_dir.is_absolute() and local.is_relative_to(run_dir):
        return local.relative_to(run_dir).as_posix() if local != PurePosixPath(run_dir) else run_dir.name
    return local.name or path


def _without_local_name_or_path(content: object) -> object:
    """A config without the local folder it was loaded from (`_name_or_path`, `name_or_path`: older transformers wrote
    them; loaders ignore them): the path's last name instead. Anything else is left as it is."""
    if not isinstance(content, dict):
        return content
    local = {key: value for key in NAME_OR_PATH_KEYS if isinstance(value := content.get(key), str) and _is_local_path(value)}
    return {**content, **{key: _shown_path(value, None) for key, value in local.items()}}


def _is_local_path(value: str) -> bool:
    """A local path rather than a Hub repo id: absolute, from the home folder, or relative from `.`."""
    return value.startswith(("/", "~", ".", "\\")) or bool(re.match(r"[A-Za-z]:[\\/]", value))


def local_places(folder: Path) -> list[str]:
    """The local paths that must not go up with an output: the home folder, the output's and the run's folders."""
    run_dir = read_record(folder).get("run_dir")
    places = [str(Path.home()), str(folder.resolve()), *([run_dir] if isinstance(run_dir, str) else [])]
    return [place for place in places if Path(place).is_absolute() and len(Path(place).parts) > 1]


def local_paths_left(upload: Path, paths: list[str]) -> list[str]:
    """Notes on the files of an upload folder (not the weights) that still hold one of `paths` (the home folder, the
    run and output folders): files copied from the checkpoints, which go up as they are."""
    notes = []
    needles = [os.fsencode(path) for path in paths]
    for file in sorted(upload.rglob("*")):
        if not file.is_file() or file.suffix in BINARY_SUFFIXES or file.stat().st_size > SMALL_FILE_LIMIT:
            continue
        data = file.read_bytes()
        found = next((needle for needle in needles if needle in data), None)
        if found is not None:
            shown = found.decode(errors="backslashreplace")
            notes.append(f"note: {file.relative_to(upload).as_posix()} holds the local path {shown}; it goes up as it is")
    return notes


def _prepare_repo(api: HfApi, repo_id: str, *, private: bool) -> None:
    _hub_call(
        lambda: api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True),
        f"cannot create or access the repo {repo_id}",
    )
    if private:
        info = _hub_call(lambda: api.repo_info(repo_id, repo_type="model"), f"cannot read the settings of {repo_id}")
        if not getattr(info, "private", False):
            raise HubError(
                f"{repo_id} already exists and is public, and --private does not change an existing repo; make it "
                "private on the Hub first, or choose another name; nothing was uploaded"
            )


def _hub_call(call: Callable, what: str, *, then: str = "nothing was uploaded"):
    try:
        return call()
    except Exception as e:  # huggingface_hub raises HTTP, network and validation errors alike
        raise HubError(f"{what}: {first_line(e)}{_hint(e)}; {then}") from e


def _hint(error: Exception) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return " (the token is invalid or expired: check HF_TOKEN or run `hf auth login`)"
    if status == 403:
        return " (the token may not write there: use a write token, and check the organisation name)"
    return ""


def branches_index(targets: list[PushTarget]) -> str:
    """The card of the main branch with the branches layout: one line per branch, with how to load it."""
    records = [read_record(t.folder) for t in targets]
    rows = "\n".join(
        f"| `{t.revision}` | {r['kind']} | {r['step']} | {r.get('config') or ''} |" for t, r in zip(targets, records)
    )
    repo_id, revision = targets[0].repo_id, targets[-1].revision
    metadata = card_metadata(records[0])  # the outputs' own cards' (library_name peft for adapters)
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=metadata.get("base_model"), library_name=metadata["library_name"], tags=metadata["tags"])
    if metadata["library_name"] == "peft":
        base = metadata.get("base_model") or "path/to/the/base/model"
        load = (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="{revision}")'
        )
    else:
        load = f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{revision}")'
    body = f"""
# Averaged models of `{Path(records[0]['run_dir']).name}`

Each branch of this repo holds one average, made by [bema-offline](https://pypi.org/project/bema-offline/);
its own model card gives the parameters and each checkpoint's effective weight.

| branch | kind | step | config |
|---|---|---|---|
{rows}

```python
{load}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
