"""`make demo` echoes a command that can be pasted into a shell."""

from __future__ import annotations

import shlex

import pytest

from shunter import demo


def test_the_echoed_command_is_the_one_run_when_pasted_into_a_shell(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Oracle: shlex.split of the echoed line gives back exactly the arguments the demo runs."""
    ran: list[list[str]] = []
    monkeypatch.setattr(demo, "cli_main", lambda argv: ran.append(argv) or 0)
    assert demo.main() == 0
    echoed = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("$ "))
    command = echoed.removeprefix("$ ").split("   #")[0]
    assert shlex.split(command) == ["shunter", *ran[0]]
