"""The package's shape: no import circle between its modules (counting imports made only for type
checking), and every ``dfq`` subcommand registered by the module of its family."""
from __future__ import annotations

import ast
from pathlib import Path

import dfq_plugins

PACKAGE = Path(dfq_plugins.__file__).parent


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imports_at_module_level(path: Path, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of the package this one imports when it loads (or under TYPE_CHECKING)."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for top in ast.parse(path.read_text()).body:
        for node in ast.walk(top) if isinstance(top, (ast.If, ast.Try)) else [top]:
            if isinstance(node, ast.ImportFrom):
                anchor = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(anchor + ([node.module] if node.module else [])) if node.level else node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in known else target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = {name for name, _ in files}
    return {name: _imports_at_module_level(path, name, is_pkg, known) for (name, is_pkg), path in files.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module, ignoring a package's own ``__init__``
    (importing a submodule always runs its package first; that is not a circle of ours)."""
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                circles.append(sorted([v, *group]))

    for v in graph:
        if v not in order:
            visit(v)
    return circles


def test_no_module_imports_one_that_imports_it_back():
    graph = _import_graph()
    assert "dfq_plugins.synthesizers.whole_set" in graph and "dfq_plugins.cli.common" in graph
    assert _circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_subcommand_is_registered_by_its_family_module():
    from dfq_plugins.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    owner = {name: parser.get_default("func").__module__.rsplit(".", 1)[-1] for name, parser in sub.choices.items()}
    assert owner == {"plugins": "cache", "cache": "cache", "synthesize": "quantize", "quantize": "quantize",
                     "bench": "bench", "speed": "bench", "dynamic": "dynamic", "deploy-bench": "deploy",
                     "run": "deploy", "scale-bench": "scale"}
