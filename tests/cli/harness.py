"""Running a command the way a user does and checking how it refuses bad input.

`refused(argv, folder)` runs `shunter ARGV` in-process with `folder` as the working directory and
returns its one stderr line after checking the contract every refusal keeps: exit status 2, exactly
one line on stderr, no traceback, and no file in `folder` created, changed or removed.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from shunter.cli import main


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` (files and directories) with its size and modification time."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            stat = path.lstat()
            found[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return found


def run_in(argv: list[str], folder: Path) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `shunter ARGV` run in-process in `folder`."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


def refused(argv: list[str], folder: Path) -> str:
    """The one line `shunter ARGV` prints when it refuses, after checking the refusal contract."""
    before = snapshot(folder)
    code, _, err = run_in(argv, folder)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}, stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got: {err}"
    assert snapshot(folder) == before, "a refused command created, changed or removed a file"
    return lines[0]
