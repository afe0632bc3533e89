"""A Hub repo for tests, without network: commits of files, branches, a fake `HfApi` that lists them, and a
stand-in for `hf_hub_download` that writes huggingface_hub's own cache layout (`blobs/`, `snapshots/<commit>/`,
`refs/`), as the real one does when it downloads. `cache_files` writes the same layout directly (a prepared cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo


def _response(status: int) -> SimpleNamespace:
    """What huggingface_hub's HTTP errors read from a response."""
    return SimpleNamespace(status_code=status, headers={}, request=None)


class FakeRepo:
    """One model repo: `commits` maps a commit hash to its files (repo path -> bytes); `branches` a name to a commit."""

    def __init__(self, repo_id: str) -> None:
        self.repo_id = repo_id
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode() + branch.encode()).hexdigest()
        self.commits[commit] = dict(files)
        self.branches[branch] = commit
        return commit


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under `folder` as repo paths (under `prefix`) -> bytes."""
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHubApi:
    """The listing part of `HfApi` over `FakeRepo`s; records calls. `private` repos raise as the Hub does without a
    token (404, RepositoryNotFoundError)."""

    def __init__(self, *repos: FakeRepo, private: tuple[str, ...] = ()) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.private = set(private)
        self.calls: list[tuple[str, str]] = []
        self.header_reads: list[str] = []

    def _repo(self, repo_id: str) -> FakeRepo:
        if repo_id not in self.repos or repo_id in self.private:
            raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: .../{repo_id}", response=_response(404))
        return self.repos[repo_id]

    def _commit(self, repo: FakeRepo, revision: str | None) -> str:
        revision = revision or "main"
        if revision in repo.commits:
            return revision
        if revision not in repo.branches:
            raise RevisionNotFoundError(f"404 Client Error. Revision Not Found: {revision}", response=_response(404))
        return repo.branches[revision]

    def repo_info(self, repo_id: str, *, revision: str | None = None, **kwargs):
        self.calls.append(("repo_info", repo_id))
        repo = self._repo(repo_id)
        return SimpleNamespace(id=repo_id, sha=self._commit(repo, revision))

    def list_repo_tree(self, repo_id: str, *, revision: str | None = None, recursive: bool = False, **kwargs):
        self.calls.append(("list_repo_tree", repo_id))
        repo = self._repo(repo_id)
        files = repo.commits[self._commit(repo, revision)]
        folders = sorted({path.rsplit("/", 1)[0] for path in files if "/" in path})
        for folder in folders:
            yield RepoFolder(path=folder, oid="0" * 40)
        for path, data in sorted(files.items()):
            yield RepoFile(path=path, size=len(data), oid=hashlib.sha1(data).hexdigest())

    def list_repo_refs(self, repo_id: str, **kwargs):
        self.calls.append(("list_repo_refs", repo_id))
        repo = self._repo(repo_id)
        branches = [SimpleNamespace(name=name, ref=f"refs/heads/{name}", target_commit=commit) for name, commit in repo.branches.items()]
        return SimpleNamespace(branches=branches, tags=[], converts=[])

    def parse_safetensors_file_metadata(self, repo_id: str, filename: str, *, revision: str | None = None, **kwargs):
        """As huggingface_hub parses a header read over HTTP range requests: only the header's bytes are used."""
        self.header_reads.append(filename)
        repo = self._repo(repo_id)
        data = repo.commits[self._commit(repo, revision)][filename]
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        metadata = header.pop("__metadata__", {})
        tensors = {name: TensorInfo(dtype=e["dtype"], shape=e["shape"], data_offsets=tuple(e["data_offsets"])) for name, e in header.items()}
        return SafetensorsFileMetadata(metadata=metadata, tensors=tensors)


def _write_cached(cache: Path, repo_id: str, commit: str, path: str, data: bytes) -> Path:
    """One file in huggingface_hub's cache layout: a blob, and a relative link to it from the snapshot."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(data)
    pointer = storage / "snapshots" / commit / path
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.is_symlink():
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return pointer


def cache_files(cache: Path, repo: FakeRepo, *, branches: tuple[str, ...] | None = None, only=None) -> None:
    """Prepare the cache as a completed download would leave it: the files (all, or those for which `only(path)`
    holds) of the given branches' commits, and their refs."""
    for branch in branches if branches is not None else tuple(repo.branches):
        commit = repo.branches[branch]
        for path, data in repo.commits[commit].items():
            if only is None or only(path):
                _write_cached(cache, repo.repo_id, commit, path, data)
        ref = cache / ("models--" + repo.repo_id.replace("/", "--")) / "refs" / branch
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)


class FakeDownload:
    """Stands for `hf_hub_download`: fetches a file of a `FakeRepo` into the cache layout; records each call."""

    def __init__(self, *repos: FakeRepo) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.calls: list[str] = []

    def __call__(self, repo_id: str, filename: str, *, revision: str, cache_dir: Path, **kwargs) -> str:
        self.calls.append(filename)
        data = self.repos[repo_id].commits[revision][filename]
        return str(_write_cached(Path(cache_dir), repo_id, revision, filename, data))
