"""Output files written whole or not at all, and output paths checked before any work is done.

Every file Shunter writes for a user (plans, traces, reports, plots, checkpoints' state) goes
through `atomic_output`: a temporary file in the same directory, renamed over the target only once
it is complete, and removed on any error or interrupt, so no reader ever sees half a file and a
failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from shunter.errors import ShunterError


def read_text_input(path: str | Path, kind: str, text_format: str) -> str:
    """The UTF-8 text of an input file (a `kind` file in `text_format`, e.g. a plan in JSON); one
    ShunterError naming the file when it is missing, unreadable or not text."""
    path = Path(path)
    if not path.is_file():
        raise ShunterError(f"{path}: {kind} file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ShunterError(f"{path}: not valid {text_format}: {exc}") from None
    except OSError as exc:
        raise ShunterError(f"{path}: cannot read the {kind} file: {exc.strerror or exc}") from None


def check_output_path(path: str | Path, field: str = "output") -> Path:
    """The path, if a file can be written there; else one ShunterError naming `field`.

    Called before the work whose result goes there: a path that is a directory, under a file, or in
    a directory that cannot be written fails now instead of after minutes of work."""
    path = Path(path)
    if path.is_dir():
        raise ShunterError(f"{field}: {path} is a directory; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ShunterError(f"{field}: cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ShunterError(f"{field}: cannot write {path}: {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ShunterError(f"{field}: cannot write {path}: the file is read-only")
    return path


# what `--plot FILE` can write, named by FILE's suffix (matplotlib's savefig formats without extras)
PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format(path: str | Path, field: str = "plot") -> str:
    """The figure format `path`'s suffix names ("x.pdf" -> "pdf"); one error naming `field` when the
    suffix is missing or not one of PLOT_FORMATS, so a .pdf never holds PNG bytes."""
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in PLOT_FORMATS:
        raise ShunterError(
            f"{field}: cannot draw {path}: the suffix names the format, one of "
            + ", ".join("." + name for name in PLOT_FORMATS)
        )
    return suffix


def check_plot_path(path: str | Path, field: str = "plot") -> Path:
    """check_output_path for a figure, whose suffix must also name a format it can be drawn in."""
    plot_format(path, field)
    return check_output_path(path, field)


@contextmanager
def atomic_output(path: str | Path, binary: bool = False) -> Iterator[IO[Any]]:
    """with atomic_output(path) as f: write to f; `path` appears (or is replaced) only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ShunterError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes a private file; an output is as readable as any other
        os.replace(tmp, path)
    except OSError as exc:
        # a disk that fills up, or a target that became a directory, after the work: still one line
        Path(tmp).unlink(missing_ok=True)
        raise ShunterError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, document: object, indent: int = 1) -> None:
    """JSON to `path`, atomically, with a final newline."""
    with atomic_output(path) as f:
        json.dump(document, f, indent=indent)
        f.write("\n")
