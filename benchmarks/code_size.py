"""Lines of `src/` by kind: code, docstrings, comments and blank lines, per file and in all.

`python benchmarks/code_size.py [--top N]`: the totals, then the N files with most lines.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

KINDS = ("code", "docstring", "comment", "blank")


def line_kinds(source: str) -> list[str]:
    """The kind of each line of a Python file."""
    lines = source.splitlines()
    kinds = ["blank" if not s.strip() else "comment" if s.strip().startswith("#") else "code"
             for s in lines]  # fmt: skip
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(ast.parse(source)):
        first = node.body[0] if isinstance(node, scopes) and node.body else None
        if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
            for i in range(first.lineno - 1, first.end_lineno):
                kinds[i] = "docstring"
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).parent.parent / "src")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    files = {p: line_kinds(p.read_text()) for p in sorted(args.src.rglob("*.py"))}
    total = {k: sum(kinds.count(k) for kinds in files.values()) for k in KINDS}
    print(f"{sum(total.values())} lines in {len(files)} files: " + ", ".join(
        f"{total[k]} {k}" for k in KINDS))  # fmt: skip
    for path, kinds in sorted(files.items(), key=lambda item: -len(item[1]))[: args.top]:
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in KINDS)
        print(f"{len(kinds):6d}  {path.relative_to(args.src)}  ({counts})")


if __name__ == "__main__":
    main()
