"""Push bema-offline output folders to the Hugging Face Hub.

An output folder (one with `bema_offline.json` and safetensors weights) becomes one repo, or one branch of a
repo. A run with several outputs (`--every-update`, `--save ema,bema`, several schedules) pushes each of them:

- `repos` layout: one repo per output, `ORG/NAME-<subfolder with / replaced by ->`, e.g. `ORG/NAME-step-800`;
- `branches` layout: one repo `ORG/NAME` with a branch per output, e.g. `step-800`, and an index card on main.

Everything that can fail without uploading runs first: the folders are checked, the repo ids and branch
names are validated, the token is looked up, and every repo and branch is created (or found), before the first
file goes up. The model card is rendered again for its repo, so that its load snippet names the repo.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._version import __version__
from ..errors import BemaError, DataError, UsageError
from ..files import read_json_file
from ..sources.run import INDEX_FILE, SINGLE_FILE
from .card import CARD_FILE, PROVENANCE_FILE, PROVENANCE_LIMIT, write_card

if TYPE_CHECKING:  # imported when used, not at startup
    from huggingface_hub import HfApi

LAYOUTS = ("repos", "branches")
# Weight files already in the repo (or the branch) that the upload does not replace are deleted in the same commit,
# so that a repo never mixes the new weights with stale shards of an earlier push.
DELETE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "effective_weights.png", "effective_weights.svg"]
_REPO_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


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
        `DataError`: the folder is not a bema-offline output, or an output in it lacks its weights.
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
        if not ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()):
            raise DataError(f"{folder}: has {PROVENANCE_FILE} but no {SINGLE_FILE} or {INDEX_FILE}; the output is incomplete")
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

    for repo in dict.fromkeys(t.repo_id for t in targets):
        _prepare_repo(api, repo, private=private)
    for target in targets:
        if target.revision:
            _hub_call(
                lambda: api.create_branch(target.repo_id, branch=target.revision, repo_type="model", exist_ok=True),
                f"cannot create branch {target.revision!r} in {target.repo_id}",
            )

    pushed: list[PushTarget] = []
    for target in targets:
        record = read_record(target.folder)
        write_card(target.folder, record, repo_id=target.repo_id, revision=target.revision)
        message = commit_message or f"bema-offline: {record['kind'].upper()} of {Path(record['run_dir']).name} at step {record['step']}"
        try:
            info = api.upload_folder(
                repo_id=target.repo_id,
                folder_path=str(target.folder),
                repo_type="model",
                revision=target.revision,
                commit_message=message,
                delete_patterns=DELETE_PATTERNS,
            )
        except Exception as e:
            done = ", ".join(t.where for t in pushed) or "nothing"
            raise HubError(
                f"uploading {target.folder} to {target.where} failed ({_first_line(e)}); pushed so far: {done}; "
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
        raise HubError(f"{what}: {_first_line(e)}{_hint(e)}; {then}") from e


def _hint(error: Exception) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return " (the token is invalid or expired: check HF_TOKEN or run `hf auth login`)"
    if status == 403:
        return " (the token may not write there: use a write token, and check the organisation name)"
    return ""


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def branches_index(targets: list[PushTarget]) -> str:
    """The card of the main branch with the branches layout: one line per branch, with how to load it."""
    records = [read_record(t.folder) for t in targets]
    rows = "\n".join(
        f"| `{t.revision}` | {r['kind']} | {r['step']} | {r.get('config') or ''} |" for t, r in zip(targets, records)
    )
    repo_id = targets[0].repo_id
    tags = ["bema", "bema-offline", *records[0].get("training", {}).get("tags", [])]
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=records[0].get("base_model_id"), library_name="transformers", tags=list(dict.fromkeys(tags)))
    body = f"""
# Averaged models of `{Path(records[0]['run_dir']).name}`

Each branch of this repo holds one average, made by [bema-offline](https://pypi.org/project/bema-offline/);
its own model card gives the parameters and each checkpoint's effective weight.

| branch | kind | step | config |
|---|---|---|---|
{rows}

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{targets[-1].revision}")
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
