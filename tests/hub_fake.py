"""A fake `HfApi` that records every call and keeps what each upload would send; no network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace


class FakeHubError(Exception):
    """Like huggingface_hub's HTTP errors: a message, and a response with a status code."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.response = SimpleNamespace(status_code=status)


class FakeApi:
    """Records calls as `(method, repo_id, kwargs)`. `fail` maps a method name to the repo it fails for;
    `public` lists repos that already exist and are public."""

    def __init__(self, *, fail: dict[str, str] | None = None, public: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.uploads: list[dict] = []  # per upload_folder: repo, revision, files and the card text sent
        self.fail = fail or {}
        self.public = set(public)

    def _record(self, method: str, repo_id: str, kwargs: dict) -> None:
        self.calls.append((method, repo_id, kwargs))
        if self.fail.get(method) == repo_id:
            raise FakeHubError(f"403 Forbidden: you cannot {method} {repo_id}\n(request id 123)")

    def create_repo(self, repo_id: str, **kwargs):
        self._record("create_repo", repo_id, kwargs)
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def repo_info(self, repo_id: str, **kwargs):
        self._record("repo_info", repo_id, kwargs)
        return SimpleNamespace(id=repo_id, private=repo_id not in self.public)

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self._record("create_branch", repo_id, kwargs)

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs):
        self._record("upload_folder", repo_id, dict(kwargs, folder_path=folder_path))
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        card = (folder / "README.md").read_text() if (folder / "README.md").exists() else None
        self.uploads.append({"repo_id": repo_id, "revision": kwargs.get("revision"), "files": files, "card": card})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    def upload_file(self, *, repo_id: str, path_or_fileobj, path_in_repo: str, **kwargs):
        self._record("upload_file", repo_id, dict(kwargs, path_in_repo=path_in_repo, content=path_or_fileobj))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/def")

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.calls]
