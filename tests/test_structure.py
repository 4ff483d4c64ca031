"""The package's shape: an import graph without cycles, one home per constant, one public face."""

from __future__ import annotations

import ast
from pathlib import Path

import sstoken_trl

PACKAGE = Path(sstoken_trl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """sstoken_trl modules imported by the file, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sstoken_trl"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sstoken_trl")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in runtime_imports(path):
            # `from sstoken_trl.a import b` may name a module b or an object of module a.
            edges.add(target)
            # importing a.b.c also runs the package __init__ of a.b (unless the importer lives inside a.b)
            parts = target.split(".")
            parents = {".".join(parts[:i]) for i in range(2, len(parts))}
            edges |= {p for p in parents if not name.startswith(p + ".")}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_trl_internals_are_imported_in_one_module_only():
    """Private TRL / transformers / accelerate access (trl.trainer.*, `_metrics`, frame walks) lives in one file."""
    private = ("trl.trainer", "transformers.trainer_utils", "inspect.currentframe", "._metrics", "_signature_columns")
    offenders = {
        module_name(p): [s for s in private if s in p.read_text()]
        for p in PACKAGE.rglob("*.py")
        if p.name != "trl_internals.py"
    }
    assert {m: s for m, s in offenders.items() if s} == {}


def test_constants_have_one_definition():
    for constant in ("IGNORE_INDEX =", "USER_TAG =", "ASSISTANT_TAG =", "REAL_LABELS =", "CACHED_LOG_PROBS ="):
        homes = [module_name(p) for p in PACKAGE.rglob("*.py") if constant in p.read_text()]
        assert len(homes) == 1, (constant, homes)


def test_history_batch_key_stays_in_its_source():
    users = [module_name(p) for p in PACKAGE.rglob("*.py") if "CACHED_LOG_PROBS" in p.read_text()]
    assert users == ["sstoken_trl.history.cache"]


def test_public_api():
    assert set(sstoken_trl.__all__) == {"SSTokenCallback", "SSTokenCollator", "SSTokenConfig", "pretokenize"}
