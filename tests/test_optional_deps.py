"""Core installs have torch, safetensors, huggingface_hub, click and tqdm only: `import bema_offline`,
`bema-average` and `bema-offline push --dry-run` must work without trl, transformers, datasets or matplotlib, and
`bema-offline dpo` must name the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from synthetic import make_run

OPTIONAL = ("trl", "transformers", "datasets", "matplotlib")
PRELUDE = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None  # import fails as if not installed\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=300)


def test_core_commands_without_optional_dependencies(tmp_path: Path) -> None:
    run_dir, base_dir, _ = make_run(tmp_path, [2, 4])
    out = tmp_path / "out"
    code = f"""
import bema_offline, bema_offline.output.hub, bema_offline.train.dpo, bema_offline.output.fingerprint
from bema_offline.cli import _run, average_command, cli
try:
    _run(average_command, [{str(run_dir)!r}, "--base-model", {str(base_dir)!r}, "--update-freq", "2", "-o", {str(out)!r}, "-q"])
    _run(cli, ["push", {str(out)!r}, "my-org/avg", "--dry-run"])
    _run(cli, ["dpo", "--ref-model", {str(out)!r}, "--dataset", "x.jsonl", "--output-dir", "o"])
except SystemExit as e:
    print("exit", e.code)
loaded = sorted(name for name in {OPTIONAL!r} if sys.modules.get(name) is not None)
print("loaded", loaded)
"""
    result = run_python(code)
    assert "would push" in result.stdout, result.stderr
    assert "exit 1" in result.stdout and "loaded []" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: bema-offline dpo needs trl, transformers, datasets: pip install 'bema-offline[dpo]'"
    )
    card = (out / "README.md").read_text()
    assert "](effective_weights.svg)" in card and (out / "effective_weights.svg").read_text().startswith("<svg")  # no matplotlib needed
