"""shunter.network is a leaf: the planner, the simulator and the runtime import it, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import shunter.network

ALLOWED = ("shunter.network", "shunter.errors", "shunter.units")


def test_the_network_package_imports_only_itself_errors_and_units_from_shunter() -> None:
    """Oracle: every import statement of every module in the package, read from its source."""
    imported: set[str] = set()
    for path in Path(shunter.network.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0] == "shunter"}
    outside = [name for name in ours if not any(name == a or name.startswith(a + ".") for a in ALLOWED)]
    assert "shunter.network.cost" in ours and outside == []
