"""The shape of the source itself: short functions, and no import deferred into a function to
hide a cycle between cifarlab's modules (a deferred import is for heavy or optional packages)."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 70


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imported(node: ast.AST, modules: dict) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    else:
        return set()
    return {n for n in names if n in modules}


def test_no_function_in_src_is_longer_than_70_lines():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, f"split these into functions of at most {MAX_LINES} lines: {long}"


def test_no_import_inside_a_function_hides_an_import_cycle():
    modules = _modules()
    uses = {  # every cifarlab module each module imports, at its top or inside a function
        name: set().union(*(_imported(n, modules) for n in ast.walk(tree)), set())
        for name, tree in modules.items()
    }

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in uses[todo.pop()]:
                parents = {".".join(nxt.split(".")[:i]) for i in range(2, nxt.count(".") + 1)}
                for m in {nxt, *parents} & modules.keys() - seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    hidden = [
        f"{name} -> {target}"
        for name, tree in modules.items()
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
        for target in _imported(node, modules)
        if not target.startswith(name + ".") and name in reaches(target)
    ]
    assert not hidden, f"these imports inside functions hide a cycle: {hidden}"


def test_no_source_file_names_a_machine_or_a_review():
    """What a recipe reaches, and on which machine, belongs in docs/benchmarks.md, not in code."""
    word = re.compile(r"hostile|H100|H200|A100|EPYC|Xeon", re.IGNORECASE)
    found = [
        f"{path.relative_to(SRC)}:{n}"
        for path in sorted([*SRC.rglob("*.py"), *SRC.rglob("*.yaml")])
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if word.search(line)
    ]
    assert not found, f"name no machine or review in the sources: {found}"
