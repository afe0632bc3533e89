"""Run a click command the way the `bema-offline` / `bema-average` entry points do."""

from __future__ import annotations

from bema_offline.cli import _run


def run_cli(command, args: list, capsys) -> tuple[int, str, str]:
    """Run `command` with `args` like `main()`: one-line errors and exit codes. Returns (code, stdout, stderr)."""
    try:
        _run(command, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
