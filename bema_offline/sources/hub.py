"""Runs on the Hugging Face Hub: `hf://ORG/NAME[@REVISION]`, as a local run folder that downloads as it is read.

Two ways a run lies on the Hub:

- **checkpoint folders**: a run pushed with `hub_strategy="all_checkpoints"` has `checkpoint-N/` folders in the repo
  (at one revision, `main` unless `@REVISION` says otherwise);
- **revisions**: Pythia, OLMo and others publish each checkpoint as a branch (`step1000`, `step1000-tokens4B`, ...);
  `--revisions` names them, or matches them with a pattern (`'step*'`, fnmatch).

`open_hub_run` lists the run (file names and sizes, no download). A `HubDownloads` then gives the planner and the
engine an ordinary run folder of its own, with a `checkpoint-N/` folder for every step of the repo; into it go links
to huggingface_hub's cache (`snapshots/<commit>/...`) as the files of a step are downloaded. Only what a step needs
is downloaded: its weights (in the layout its folder holds: safetensors, else `.bin`, else an FSDP or DeepSpeed
checkpoint) and its small files (config, tokenizer, `trainer_state.json`, indexes). Downloads run one step ahead
of whoever consumes them, on a background thread.

With `keep=False` (`--no-keep-downloads`) the weights a step downloaded are deleted from the cache once the engine
has read them (`release`); files that were in the cache before the run are never deleted, and small files are
kept. The planner then reads safetensors headers over HTTP range requests (`remote_source`), so that the disk
holds about one checkpoint (plus the one being downloaded) at any time.

How a revision names its step: the number after `step` when the name has exactly one `step<digits>`
(`step1000-tokens4B` is step 1000); else the name's only run of digits (`checkpoint-500`, `ckpt_3000`); a name
with no number, or with several numbers and no single `step<digits>`, is refused.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import DataError, UsageError
from .run import SIDECAR_FILES, load_source
from .safetensors_io import INDEX_FILE, SINGLE_FILE, tensor_info
from .tensors import WeightSource

if TYPE_CHECKING:
    from huggingface_hub import HfApi

HUB_PREFIX = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_STEP_WORD = re.compile(r"step[-_]?([0-9]+)", re.IGNORECASE)
_DIGITS = re.compile(r"[0-9]+")
# Small files a step's folder may need besides SIDECAR_FILES: kept even with keep=False.
SMALL_FILES = (*SIDECAR_FILES, "trainer_state.json", INDEX_FILE, "pytorch_model.bin.index.json", "adapter_config.json", "latest")
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def is_hub_url(run: object) -> bool:
    """Whether `run` names a run on the Hub (`hf://...`) rather than a local folder."""
    return isinstance(run, str) and run.startswith(HUB_PREFIX)


def parse_hub_url(url: str) -> tuple[str, str | None]:
    """`hf://ORG/NAME[@REVISION]` as `(repo_id, revision)`.

    Raises:
        `UsageError`: not of that form.

    Example:

    ```python
    >>> parse_hub_url("hf://my-org/dpo-run@v2")
    ('my-org/dpo-run', 'v2')
    ```
    """
    rest = url[len(HUB_PREFIX) :] if url.startswith(HUB_PREFIX) else ""
    repo_id, at, revision = rest.rstrip("/").partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or (at and not revision):
        raise UsageError(f"{url}: not a Hub run; write it as hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return repo_id, revision or None


def revision_step(name: str) -> int | None:
    """The training step a revision's name stands for, or None when the name holds no number or is ambiguous (see
    the module docstring).

    Example:

    ```python
    >>> revision_step("step1000-tokens4B"), revision_step("checkpoint-500"), revision_step("main")
    (1000, 500, None)
    ```
    """
    steps = _STEP_WORD.findall(name)
    if len(steps) == 1:
        return int(steps[0])
    numbers = _DIGITS.findall(name)
    return int(numbers[0]) if len(numbers) == 1 and not steps else None


@dataclass
class HubCheckpoint:
    """One step of a Hub run: where its files lie (`commit`, under `prefix`) and, once listed, their sizes."""

    step: int
    commit: str
    prefix: str  # "checkpoint-400/" in a run of folders, "" for a revision
    label: str  # how messages name it: "checkpoint-400" or "revision step400"
    files: dict[str, int] | None = None  # path under `prefix` -> size; None until listed


@dataclass
class HubRun:
    """A run on the Hub, listed but not downloaded.

    Args:
        repo_id (`str`): ORG/NAME.
        revision (`str`, *optional*): the revision asked for (`@REVISION`); None with `--revisions`.
        checkpoints (`dict[int, HubCheckpoint]`): the steps found, by step.
        notes (`list[str]`): what a user should know (ignored folders, an offline listing).
    """

    repo_id: str
    revision: str | None
    checkpoints: dict[int, HubCheckpoint]
    notes: list[str] = field(default_factory=list)
    offline: bool = False  # listed from the cache (HF_HUB_OFFLINE=1)
    lister: Any = field(default=None, repr=False, compare=False)  # lists a revision's files when first needed

    @property
    def url(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def make_hub_api() -> HfApi:
    """The client used unless one is given (tests pass a fake); the token is the saved one (`HF_TOKEN`, `hf auth
    login`), if any."""
    from huggingface_hub import HfApi

    return HfApi(library_name="bema-offline", library_version=__version__)


def open_hub_run(
    url: str, *, revisions: str | None = None, api: Any | None = None, cache_dir: str | Path | None = None
) -> HubRun:
    """List a run on the Hub: its steps, and (for checkpoint folders) each step's files. Nothing is downloaded.

    Offline (`HF_HUB_OFFLINE=1`) the listing comes from huggingface_hub's cache, and the steps are those cached.

    Args:
        url (`str`): `hf://ORG/NAME` or `hf://ORG/NAME@REVISION`.
        revisions (`str`, *optional*): comma-separated revision names or fnmatch patterns (`'step*'`); each is one
            step (see `revision_step`).
        api (`HfApi`, *optional*): the client for listing; defaults to `make_hub_api()`.
        cache_dir (`str | Path`, *optional*): huggingface_hub's cache; defaults to its own (`HF_HUB_CACHE`).

    Raises:
        `UsageError`: a bad url or `--revisions`. `DataError`: no such repo or revision, a private repo without a
        token, no checkpoints, a revision pattern matching nothing, an offline cache without the repo.

    Example:

    ```python
    >>> run = open_hub_run("hf://EleutherAI/pythia-160m", revisions="step1000,step2000")
    >>> sorted(run.checkpoints)
    [1000, 2000]
    ```
    """
    repo_id, revision = parse_hub_url(url)
    if revisions is not None and revision is not None:
        raise UsageError(f"{url}: give either @{revision} or --revisions, not both")
    lister = _Lister(repo_id, api, cache_dir)
    if revisions is None:
        commit, files = lister.files(revision)
        run = _folders_run(repo_id, revision, commit, files)
    else:
        run = _revisions_run(repo_id, revisions, lister.refs())
    run.offline = lister.offline
    if lister.offline:
        run.notes.append(f"offline (HF_HUB_OFFLINE=1): {run.url} listed from the cache, so only cached steps are seen")
    run.lister = lister
    return run


def checkpoint_files(run: HubRun, step: int) -> dict[str, int]:
    """The files of one step (path under its prefix -> size), listed on first use."""
    checkpoint = run.checkpoints[step]
    if checkpoint.files is None:
        _, files = run.lister.files(checkpoint.commit)
        checkpoint.files = files
    return checkpoint.files


def weight_files(run: HubRun, step: int) -> list[str]:
    """The files holding a step's weights, in the layout `load_source` reads first (safetensors, `.bin`, FSDP,
    DeepSpeed, a PEFT adapter), under the step's prefix.

    Raises:
        `DataError`: the step holds no weights this tool reads.
    """
    files = checkpoint_files(run, step)
    top = [name for name in files if "/" not in name]
    if "adapter_config.json" in top:  # a PEFT adapter, whatever lies beside it (as `load_source` decides locally)
        choices = [[name] for name in ("adapter_model.safetensors", "adapter_model.bin") if name in top]
    else:
        choices = [
            [SINGLE_FILE] if SINGLE_FILE in top else [n for n in top if n.endswith(".safetensors") and n.startswith("model")],
            [n for n in top if n.endswith(".bin") and n.startswith("pytorch_model") and n not in NOT_WEIGHTS],
            [n for n in files if n.startswith("pytorch_model_fsdp_0/")],
            [n for n in files if re.match(r"global_step[0-9]+/", n)] if "latest" in files else [],
        ]
    chosen = next((choice for choice in choices if choice), None)
    if chosen is None:
        checkpoint = run.checkpoints[step]
        held = ", ".join(sorted(files)[:8]) or "nothing"
        raise DataError(f"{run.url}: {checkpoint.label} holds no model weights (it holds {held}); leave it out with --max-step or --min-step")
    return sorted(chosen)


def small_files(run: HubRun, step: int) -> list[str]:
    """The config, tokenizer, trainer state and index files of a step that are present."""
    files = checkpoint_files(run, step)
    return [name for name in SMALL_FILES if name in files]


class _Lister:
    """Lists a repo's files and branches, on the Hub or (offline) in the cache."""

    def __init__(self, repo_id: str, api: Any | None, cache_dir: str | Path | None) -> None:
        from huggingface_hub import constants

        self.repo_id = repo_id
        self.offline = api is None and constants.is_offline_mode()
        self.api = api if api is not None or self.offline else make_hub_api()
        self.cache_dir = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)

    @property
    def storage(self) -> Path:
        return self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))

    def files(self, revision: str | None) -> tuple[str, dict[str, int]]:
        """(commit, {path: size}) of the repo at `revision` (default: main)."""
        if self.offline:
            return self._cached_files(revision or "main")
        commit = self._call(lambda: self.api.repo_info(self.repo_id, revision=revision).sha, revision)
        entries = self._call(lambda: list(self.api.list_repo_tree(self.repo_id, revision=commit, recursive=True)), revision)
        return commit, {entry.path: entry.size for entry in entries if getattr(entry, "size", None) is not None}

    def refs(self) -> dict[str, str]:
        """Branch and tag names -> commit."""
        if self.offline:
            refs_dir = self.storage / "refs"
            if not refs_dir.is_dir():
                raise self._not_cached()
            return {
                path.relative_to(refs_dir).as_posix(): path.read_text().strip()
                for path in sorted(refs_dir.rglob("*"))
                if path.is_file()
            }
        refs = self._call(lambda: self.api.list_repo_refs(self.repo_id), None)
        found = {ref.name: ref.target_commit for ref in refs.tags}
        found.update({ref.name: ref.target_commit for ref in refs.branches})
        return found

    def _cached_files(self, revision: str) -> tuple[str, dict[str, int]]:
        if not self.storage.is_dir():
            raise self._not_cached()
        commit = revision
        if not _COMMIT.fullmatch(revision):
            ref = self.storage / "refs" / revision
            if not ref.is_file():
                raise DataError(
                    f"{HUB_PREFIX}{self.repo_id}@{revision}: offline (HF_HUB_OFFLINE=1) and this revision is not in the "
                    f"cache {self.cache_dir}; unset HF_HUB_OFFLINE to list it on the Hub"
                )
            commit = ref.read_text().strip()
        snapshot = self.storage / "snapshots" / commit
        files = {}
        for path in sorted(snapshot.rglob("*")) if snapshot.is_dir() else []:
            if path.is_file():
                files[path.relative_to(snapshot).as_posix()] = path.stat().st_size
        return commit, files

    def _not_cached(self) -> DataError:
        return DataError(
            f"{HUB_PREFIX}{self.repo_id}: offline (HF_HUB_OFFLINE=1) and not in the cache {self.cache_dir}; unset "
            f"HF_HUB_OFFLINE to download it, or fetch it first with `hf download {self.repo_id}`"
        )

    def _call(self, call: Callable, revision: str | None):
        try:
            return call()
        except Exception as e:  # huggingface_hub raises HTTP, network and validation errors alike
            raise hub_error(e, self.repo_id, revision) from e


def hub_error(error: Exception, repo_id: str, revision: str | None, *, what: str = "list its files") -> DataError:
    """One line for what the Hub refused: no such repo or revision, a gated or private repo, the network."""
    name = type(error).__name__
    where = HUB_PREFIX + repo_id + (f"@{revision}" if revision else "")
    first = (str(error).strip().splitlines() or [name])[0]
    if name == "GatedRepoError":
        return DataError(f"{where}: a gated repo; accept its conditions on its Hub page, then use a token (HF_TOKEN or `hf auth login`)")
    if name == "RepositoryNotFoundError" or getattr(getattr(error, "response", None), "status_code", None) == 401:
        from huggingface_hub import get_token

        if get_token() is None:
            return DataError(f"{where}: no such repo, or a private one and no Hugging Face token is set; check the name, or set HF_TOKEN (or run `hf auth login`)")
        return DataError(f"{where}: no such repo, or the token cannot read it; check the name and the token's access")
    if name == "RevisionNotFoundError":
        return DataError(f"{where}: no such revision (branch, tag or commit) in {repo_id}; check the name after @")
    if name == "OfflineModeIsEnabled":
        return DataError(f"{where}: cannot {what} with HF_HUB_OFFLINE=1; unset it, or fetch the files first with `hf download {repo_id}`")
    return DataError(f"{where}: cannot {what} ({first}); check the network, or set HF_HUB_OFFLINE=1 to use the cache")


def _folders_run(repo_id: str, revision: str | None, commit: str, files: dict[str, int]) -> HubRun:
    """The `checkpoint-N/` folders of one revision."""
    by_folder: dict[str, dict[str, int]] = {}
    for path, size in files.items():
        folder, slash, rest = path.partition("/")
        if slash and folder.startswith("checkpoint-"):
            by_folder.setdefault(folder, {})[rest] = size
    checkpoints: dict[int, HubCheckpoint] = {}
    notes = []
    for folder, contents in sorted(by_folder.items()):
        match = _CHECKPOINT.fullmatch(folder)
        if match is None:
            notes.append(f"ignored {folder}/: no step number in its name")
            continue
        step = int(match.group(1))
        if step == 0:  # step 0 is θ0, which is read from --base-model
            raise DataError(
                f"{HUB_PREFIX}{repo_id}: {folder}/ is a checkpoint at step 0, which is θ0, read from --base-model: download it "
                f"(hf download {repo_id} --include '{folder}/*' --local-dir base) and pass --base-model base/{folder}"
            )
        if step in checkpoints:
            raise DataError(f"{HUB_PREFIX}{repo_id}: {checkpoints[step].prefix}and {folder}/ are both step {step}; remove one of them from the repo")
        checkpoints[step] = HubCheckpoint(step, commit, folder + "/", folder, contents)
    where = HUB_PREFIX + repo_id + (f"@{revision}" if revision else "")
    if not checkpoints:
        hint = (
            "it holds one model: runs published as revisions take --revisions (e.g. --revisions 'step*')"
            if any(name.endswith((".safetensors", ".bin")) for name in files)
            else "push the run with hub_strategy='all_checkpoints', or name revisions with --revisions"
        )
        raise DataError(f"{where}: no checkpoint-N/ folders in the repo; {hint}")
    return HubRun(repo_id, revision, checkpoints, notes)


def _revisions_run(repo_id: str, spec: str, refs: dict[str, str]) -> HubRun:
    """The revisions `spec` names or matches, each as one step."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise UsageError("--revisions: give revision names or patterns, e.g. --revisions 'step*' or step1000,step2000")
    names: list[str] = []
    shown = ", ".join(sorted(refs)[:8]) + (", ..." if len(refs) > 8 else "")
    for item in items:
        if any(c in item for c in "*?["):
            matched = [name for name in sorted(refs) if fnmatch.fnmatchcase(name, item)]
            if not matched:
                raise DataError(f"--revisions {item!r} matches no branch or tag of {repo_id} (it has {len(refs)}: {shown})")
        elif item in refs:
            matched = [item]
        else:
            raise DataError(f"--revisions: {item!r} is not a branch or tag of {repo_id} (it has {len(refs)}: {shown})")
        names += [name for name in matched if name not in names]
    checkpoints: dict[int, HubCheckpoint] = {}
    named: dict[int, str] = {}
    for name in names:
        step = revision_step(name)
        if step is None:
            raise DataError(
                f"--revisions: cannot tell the step of revision {name!r} (it needs one number, or one 'step<N>'); "
                "name the revisions to average explicitly, e.g. --revisions step1000,step2000"
            )
        if step in checkpoints:
            raise DataError(f"--revisions: {named[step]!r} and {name!r} are both step {step}; name only one of them")
        checkpoints[step] = HubCheckpoint(step, refs[name], "", f"revision {name}")
        named[step] = name
    return HubRun(repo_id, None, checkpoints)


class HubDownloads:
    """A Hub run as an ordinary local run folder, whose steps are downloaded as they are needed, one ahead.

    `folder` holds `checkpoint-N/` for every step of the run (empty until fetched), so that the planner sees every
    step the repo has. `fetch(step)` waits for the step's files (starting the download of the next `ahead` steps of
    `order`) and links them in; `release(step)` says its weights were read (with `keep=False`, they are deleted).

    Args:
        run (`HubRun`): from `open_hub_run`.
        root (`str | Path`): where to make the run folder (removed by `close`), e.g. the output's parent.
        keep (`bool`, defaults to True): keep downloads in the cache; False deletes each step's weights on release.
        ahead (`int`, defaults to 1): steps downloaded ahead of the consumer.
        api (`HfApi`, *optional*): the client for remote headers (`remote_source`).
        cache_dir (`str | Path`, *optional*): huggingface_hub's cache.
        download (`Callable`, *optional*): `hf_hub_download`, or a stand-in with its signature (tests).
        log (`Callable[[str], None]`, *optional*): one line per step downloaded.

    Example:

    ```python
    >>> with HubDownloads(open_hub_run("hf://my-org/dpo-run"), "runs", keep=False) as hub:
    ...     hub.order = [0, 400, 800]
    ...     source = hub.fetch(400)   # checkpoint-800 now downloads in the background
    ...     ...                       # read it
    ...     hub.release(400)          # its weights leave the disk
    ```
    """

    def __init__(
        self,
        run: HubRun,
        root: str | Path,
        *,
        keep: bool = True,
        ahead: int = 1,
        api: Any | None = None,
        cache_dir: str | Path | None = None,
        download: Callable[..., str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        from huggingface_hub import constants

        self.run = run
        self.keep = keep
        self.ahead = max(0, ahead)
        self.api = api if api is not None else getattr(run.lister, "api", None)
        self.cache_dir = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
        self._download = download
        self.log = log or (lambda line: None)
        self.order: list[int] = sorted(run.checkpoints)
        self.folder = Path(tempfile.mkdtemp(prefix=".bema-hub-", dir=root))
        for step in run.checkpoints:
            (self.folder / f"checkpoint-{step}").mkdir()
        self._lock = threading.Condition()
        self._queue: list[int] = []  # steps to download, in order
        self._wanted: set[int] = set()  # steps queued, downloading or done
        self._done: dict[int, BaseException | None] = {}  # step -> None when its files are in, or the error
        self._downloaded: dict[int, list[Path]] = {}  # step -> cache files this run downloaded (weights)
        self._planned: dict[int, WeightSource] = {}  # headers read over range requests, checked on arrival
        self._closed = False
        self.downloaded_bytes = 0
        self.peak_bytes = 0  # the most bytes of weights this run downloaded on disk at once
        self._on_disk = 0
        self._thread = threading.Thread(target=self._work, name="bema-hub-download", daemon=True)
        self._thread.start()

    # --- what the planner and the engine call -----------------------------------------------------------------

    def prepare(self) -> Path:
        """Fetch the small files of the newest step (its `trainer_state.json` gives the run's cadence) and return
        the run folder."""
        newest = max(self.run.checkpoints)
        self._link_small(newest)
        return self.folder

    def source(self, step: int) -> WeightSource:
        """The headers of a step, for the planner. With `keep`, or offline, or for a layout other than
        safetensors, the step is fetched (its files then stay until `release`); else its safetensors headers are
        read over HTTP range requests, and nothing large is downloaded yet."""
        if self.keep or self.run.offline or self._local(step):
            return self.fetch(step)
        names = weight_files(self.run, step)
        if not all(name.endswith(".safetensors") for name in names) or self.api is None:
            return self.fetch(step)
        self._link_small(step)
        planned = remote_source(self.run, step, self.folder / f"checkpoint-{step}", self.api)
        self._planned[step] = planned
        return planned

    def fetch(self, step: int) -> WeightSource:
        """Wait for a step's files (downloading the next `ahead` steps of `order` meanwhile) and read its headers.

        Raises:
            `ValueError`: not a step of the run (the base model is not on the Hub run: fetch it from the plan).
        """
        if step not in self.run.checkpoints:
            raise ValueError(f"step {step} is not a step of {self.run.url}")
        with self._lock:
            self._want(step)
            if step in self.order:
                position = self.order.index(step)
                for later in self.order[position + 1 : position + 1 + self.ahead]:
                    self._want(later)
            while step not in self._done:
                self._lock.wait()
            error = self._done[step]
        if error is not None:
            raise error
        arrived = load_source(self.folder / f"checkpoint-{step}", step)
        if step in self._planned:
            check_arrival(self._planned[step], arrived)
        return arrived

    def release(self, step: int) -> None:
        """The engine has read this step: with `keep=False`, delete the weights this run downloaded for it."""
        with self._lock:
            files = self._downloaded.pop(step, []) if not self.keep else []
        self._delete(step, files)

    def close(self) -> None:
        """Stop downloading; with `keep=False`, delete what this run downloaded and did not release; remove the run
        folder."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._lock.notify_all()
        self._thread.join()
        if not self.keep:
            for step in list(self._downloaded):
                self._delete(step, self._downloaded.pop(step))
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> HubDownloads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- downloading ------------------------------------------------------------------------------------------

    def _want(self, step: int) -> None:
        if step not in self._wanted and step in self.run.checkpoints:
            self._wanted.add(step)
            self._queue.append(step)
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                step = self._queue.pop(0)
            try:
                self._fetch_files(step)
                error = None
            except BaseException as e:  # handed to the consumer that waits for this step
                error = e
            with self._lock:
                self._done[step] = error
                self._lock.notify_all()

    def _fetch_files(self, step: int) -> None:
        started = time.monotonic()
        self._link_small(step)
        fetched = 0
        for name in weight_files(self.run, step):
            path, new = self._get(step, name)
            if new:
                size = path.stat().st_size
                fetched += size
                with self._lock:
                    self._downloaded.setdefault(step, []).append(path)
                    self._on_disk += size
                    self.peak_bytes = max(self.peak_bytes, self._on_disk)
            self._link(step, name, path)
        self.downloaded_bytes += fetched
        if fetched:
            self.log(
                f"downloaded {self.run.checkpoints[step].label} of {self.run.repo_id} "
                f"({fetched / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s)"
            )

    def _link_small(self, step: int) -> None:
        for name in small_files(self.run, step):
            if not (self.folder / f"checkpoint-{step}" / name).exists():
                path, _ = self._get(step, name)
                self._link(step, name, path)

    def _local(self, step: int) -> bool:
        """Whether every weight file of the step is already in the cache."""
        return all(self._cached(step, name) is not None for name in weight_files(self.run, step))

    def _cached(self, step: int, name: str) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        checkpoint = self.run.checkpoints[step]
        found = try_to_load_from_cache(self.run.repo_id, checkpoint.prefix + name, cache_dir=self.cache_dir, revision=checkpoint.commit)
        return Path(found) if isinstance(found, str) else None

    def _get(self, step: int, name: str) -> tuple[Path, bool]:
        """The cache path of a file of a step, downloaded if needed; and whether this call put its blob in the cache
        (huggingface_hub reuses a blob already there, of another commit, and then only adds the snapshot's link)."""
        cached = self._cached(step, name)
        if cached is not None:
            return cached, False
        checkpoint = self.run.checkpoints[step]
        filename = checkpoint.prefix + name
        if self._download is None:
            from huggingface_hub import hf_hub_download

            self._download = hf_hub_download
        blobs = self.cache_dir / ("models--" + self.run.repo_id.replace("/", "--")) / "blobs"
        blobs_before = set(os.listdir(blobs)) if blobs.is_dir() else set()
        try:
            path = self._download(self.run.repo_id, filename, revision=checkpoint.commit, cache_dir=self.cache_dir)
        except Exception as e:
            if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or self.run.offline:
                raise DataError(
                    f"{self.run.url}: {filename} ({checkpoint.label}) is not in the cache {self.cache_dir} and "
                    f"HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE, or fetch it first with "
                    f"`hf download {self.run.repo_id} {filename} --revision {checkpoint.commit}`"
                ) from e
            raise hub_error(e, self.run.repo_id, checkpoint.commit, what=f"download {filename}") from e
        blob = _repo_blob(Path(path))
        return Path(path), blob is not None and blob.parent == blobs and blob.name not in blobs_before

    def _link(self, step: int, name: str, path: Path) -> None:
        link = self.folder / f"checkpoint-{step}" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(os.path.abspath(path))
        except FileExistsError:  # made by the other thread (the planner and the download thread both link)
            pass

    def _delete(self, step: int, files: Iterable[Path]) -> None:
        """Delete downloaded weights: the cache's snapshot entry, the repo's blob it links to (unless another file
        this run still needs shares it), and the run folder's link. Only blobs this run put in the cache are given
        here. A blob that is itself a link into huggingface_hub's cache-wide store (hf_xet's shared blobs) loses
        only that link; the store's entry is left to huggingface_hub's own collection, which keeps it while any
        other repo's blob refers to it."""
        with self._lock:
            still_needed = {_repo_blob(path) for paths in self._downloaded.values() for path in paths}
        removed = 0
        for path in files:
            blob = _repo_blob(path)
            doomed = [path]
            if blob is not None and blob not in still_needed:  # else another step downloaded the same bytes
                removed += os.stat(blob).st_size if os.path.exists(blob) else 0
                doomed.append(blob)
            store = os.path.realpath(blob) if blob is not None and blob.is_symlink() else None
            for name in doomed:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
            if store is not None and blob not in still_needed:
                _collect_shared_blob(Path(store), self.cache_dir)
        with self._lock:
            self._on_disk -= removed
        folder = self.folder / f"checkpoint-{step}"
        for link in folder.rglob("*"):
            if link.is_symlink() and not link.exists():
                link.unlink()


def _repo_blob(pointer: Path) -> Path | None:
    """The repo's `blobs/<etag>` entry that a snapshot's link points to (one level of link: never the cache-wide
    store an entry may link to in turn), or None when the path is not a link."""
    try:
        target = os.readlink(pointer)
    except OSError:
        return None
    return Path(os.path.normpath(os.path.join(os.path.dirname(pointer), target)))


def _collect_shared_blob(store: Path, cache_dir: Path) -> None:
    """Let huggingface_hub remove an entry of its cache-wide blob store if no repo's blob refers to it any more
    (its own rule, under its own lock); nothing where this version of huggingface_hub has no such store."""
    try:
        from huggingface_hub.utils._shared_blobs import sweep_shared_blob
    except ImportError:
        return
    sweep_shared_blob(store, cache_dir=cache_dir)


def remote_source(run: HubRun, step: int, folder: Path, api: Any) -> WeightSource:
    """A step's safetensors headers read over HTTP range requests (`HfApi.parse_safetensors_file_metadata`),
    as `load_source` would read them once the files are in `folder`: the same tensors, dtypes, shapes and byte
    offsets. `HubDownloads.fetch` checks this when the files arrive (`check_arrival`). `identities` stay empty: no
    file exists yet.

    The data of a safetensors file ends where the file ends (the safetensors library refuses anything else), so
    the header's length is the file's size less 8 and less the last tensor's end offset.
    """
    checkpoint = run.checkpoints[step]
    files = checkpoint_files(run, step)
    names = weight_files(run, step)
    if SINGLE_FILE in names:
        shards = [SINGLE_FILE]
    elif (folder / INDEX_FILE).is_file():
        from ..files import read_json_file

        index = read_json_file(folder / INDEX_FILE, what="index", hint="re-save the checkpoint")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            return load_source(folder, step)  # let the reader name what is wrong, once the files are in
        shards = sorted(set(weight_map.values()))
    else:
        return load_source(folder, step)
    tensors = {}
    for shard in shards:
        if shard not in files:
            raise DataError(f"{run.url}: {checkpoint.label} names shard {shard!r}, which is not in the repo; the checkpoint is incomplete")
        try:
            metadata = api.parse_safetensors_file_metadata(run.repo_id, checkpoint.prefix + shard, revision=checkpoint.commit)
        except Exception as e:
            raise hub_error(e, run.repo_id, checkpoint.commit, what=f"read the header of {checkpoint.prefix + shard}") from e
        data_end = max((info.data_offsets[1] for info in metadata.tensors.values()), default=0)
        data_start = files[shard] - data_end
        path = folder / shard
        for name, info in metadata.tensors.items():
            entry = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
            tensors[name] = tensor_info(path, name, entry, data_start)
    if len(shards) == 1:
        ordered = sorted(tensors.values(), key=lambda t: (t.start, t.nbytes))
    else:
        ordered = sorted(tensors.values(), key=lambda t: (str(t.path), t.start))
    return WeightSource(step, folder, {t.name: t for t in ordered}, {}, layout="safetensors")


def check_arrival(planned: WeightSource, arrived: WeightSource) -> None:
    """The headers of a downloaded step are those the plan was made from.

    Raises:
        `DataError`: a tensor differs (the repo changed between planning and download).
    """
    if planned.tensors == arrived.tensors:
        return
    for name, info in planned.tensors.items():
        if arrived.tensors.get(name) != info:
            raise DataError(
                f"{arrived.label}: tensor {name!r} is not as planned from its header (the repo changed during the run?); rerun"
            )
    raise DataError(f"{arrived.label}: holds tensors the plan did not see (the repo changed during the run?); rerun")
