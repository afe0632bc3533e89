"""Shared runs for the evaluation tests (built once per session, see `eval_runs`), and a local datasets cache."""

from __future__ import annotations

import datasets
import pytest
import torch
from eval_runs import DemoSweep, GridSweep, demo_sweep, grid_sweep


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoSweep:
    return demo_sweep(tmp_path_factory)


@pytest.fixture(scope="session")
def grid(tmp_path_factory) -> GridSweep:
    return grid_sweep(tmp_path_factory)


@pytest.fixture(autouse=True)
def local_datasets_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the tests then do not fight over the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
