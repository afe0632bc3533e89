"""Values an output dtype cannot hold are refused, never clamped: torch's cast to float8 E4M3 saturates silently
(even Inf becomes 448), so the engine checks the range itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bema_offline import BEMASchedule, DataError, average


def _run(root: Path, values: dict[int, float], dtype: torch.dtype) -> tuple[Path, Path]:
    for step, value in values.items():
        folder = root / ("base" if step == 0 else f"run/checkpoint-{step}")
        folder.mkdir(parents=True)
        save_file({"w": torch.full((16,), value).to(dtype), "b": torch.linspace(-1, 1, 16).to(dtype)}, folder / "model.safetensors")
    return root / "run", root / "base"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_an_average_beyond_float8s_range_is_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    top = 448.0 if dtype == torch.float8_e4m3fn else 57344.0
    run_dir, base_dir = _run(tmp_path, {0: -top, 1: top, 2: top}, dtype)  # the bias correction overshoots +top
    schedule = BEMASchedule(update_freq=1)
    ema = torch.tensor(-top)
    for step in (1, 2):
        ema = ema * (1 - schedule.beta(step)) + schedule.beta(step) * top
    assert float(ema + schedule.alpha(2) * 2 * top) > top * 1.1  # so a saturating cast would hide it
    with pytest.raises(DataError, match="'w'"):
        average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir)
    assert not (tmp_path / "out").exists()


def test_an_average_within_float8s_range_is_written_as_torch_rounds_it(tmp_path: Path) -> None:
    run_dir, base_dir = _run(tmp_path, {0: 1.0, 1: 2.0, 2: 3.0}, torch.float8_e4m3fn)
    schedule = BEMASchedule(update_freq=1)
    average(run_dir, tmp_path / "out", schedule=schedule, base_model=base_dir)
    written = load_file(tmp_path / "out" / "model.safetensors")["w"]
    theta = {0: torch.full((16,), 1.0), 1: torch.full((16,), 2.0), 2: torch.full((16,), 3.0)}
    ema = theta[0].clone()
    for step in (1, 2):
        ema.mul_(1 - schedule.beta(step)).add_(theta[step], alpha=schedule.beta(step))
    expected = (ema + schedule.alpha(2) * (theta[2] - theta[0])).to(torch.float8_e4m3fn)
    assert written.dtype == torch.float8_e4m3fn and torch.equal(written.view(torch.uint8), expected.view(torch.uint8))
