"""The benchmarks use the package the way a user's script would: through public names only."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _private_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sauce_export"):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("_")]
            found += [f"from {node.module}"] if "._" in f".{node.module}" else []
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_benchmarks_use_no_private_names() -> None:
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert scripts
    uses = {p.name: _private_uses(ast.parse(p.read_text())) for p in scripts}
    assert {name: found for name, found in uses.items() if found} == {}
    assert _private_uses(ast.parse("run._sample_rows()")) == ["line 1: ._sample_rows"]
