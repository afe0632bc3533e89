"""Coverage-guided fuzzing of the safetensors header parser and the shard-index parser, with atheris (libFuzzer).

By hand, not in CI (atheris is not a dependency). Install it apart from the project's environment:

    pip install --target /tmp/atheris atheris
    PYTHONPATH=/tmp/atheris:. python scripts/fuzz_atheris.py header -atheris_runs=200000
    PYTHONPATH=/tmp/atheris:. python scripts/fuzz_atheris.py index -max_total_time=300

Each input is written to a file and parsed. A `DataError` is the expected outcome for a bad input; any other
exception is a finding, and libFuzzer stops and saves the input (`crash-*`). libFuzzer's last line reports the
number of inputs tried ("Done N runs in S second(s)"); `docs/reliability.md` records those numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import torch  # imported before instrumenting, so that only this project's code is instrumented
from safetensors.torch import save, save_file

with atheris.instrument_imports(include=["bema_offline"]):
    from bema_offline.sources.run import load_source
    from bema_offline.errors import DataError
    from bema_offline.sources.safetensors_io import read_header

# libFuzzer ends the process with exit(), which skips Python's clean-up: a run removes its predecessors' folders.
TMP = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
for stale in TMP.glob("bema-atheris-*"):
    shutil.rmtree(stale, ignore_errors=True)
WORKDIR = Path(tempfile.mkdtemp(prefix="bema-atheris-", dir=TMP))
SHARDS = {"model-00001-of-00002.safetensors": {"a": torch.zeros(3), "c": torch.arange(4)},
          "model-00002-of-00002.safetensors": {"b": torch.ones(2, 2)}}  # fmt: skip


def fuzz_header(data: bytes) -> None:
    path = WORKDIR / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        tensors, _ = read_header(path)
    except DataError:
        return
    for info in tensors.values():  # what a successful parse promises
        assert info.start + info.nbytes <= len(data) and info.nbytes == info.numel * info.itemsize


def fuzz_index(data: bytes) -> None:
    (WORKDIR / "model.safetensors.index.json").write_bytes(data)
    try:
        source = load_source(WORKDIR, 1)
    except DataError:
        return
    assert all(info.path.parent == WORKDIR for info in source.tensors.values())


def seed_corpus(target: str) -> Path:
    corpus = WORKDIR / "corpus"
    corpus.mkdir()
    if target == "header":
        (corpus / "valid").write_bytes(save({"w": torch.randn(3, 2), "n": torch.arange(3)}, metadata={"format": "pt"}))
    else:
        for name, tensors in SHARDS.items():
            save_file(tensors, WORKDIR / name)
        weight_map = {tensor: name for name, tensors in SHARDS.items() for tensor in tensors}
        (corpus / "valid").write_text(json.dumps({"metadata": {"total_size": 36}, "weight_map": weight_map}))
    return corpus


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "header"
    corpus = seed_corpus(target)
    args = [sys.argv[0], *[a for a in sys.argv[1:] if a.startswith("-")], str(corpus)]
    atheris.Setup(args, fuzz_header if target == "header" else fuzz_index)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
