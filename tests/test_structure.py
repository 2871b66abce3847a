"""The code's shape, read from its syntax trees (a rename cannot fool these, as it would a grep):
how a stream ends is decided in one place, and the package's imports flow one way."""

from __future__ import annotations

import ast

from tests.live import ROOT

PACKAGE = ROOT / "jarvis"


def modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(ROOT)): ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def _named_outcome(target: ast.expr) -> bool:
    if isinstance(target, ast.Name):
        return "outcome" in target.id.lower()
    if isinstance(target, ast.Attribute):
        return "outcome" in target.attr.lower()
    if isinstance(target, (ast.Tuple, ast.List)):
        return any(_named_outcome(element) for element in target.elts)
    return False


def outcome_assignments(tree: ast.Module) -> list[int]:
    """Lines where something named *outcome* is assigned, or an Ending is made."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
            targets = [node.target]
        elif isinstance(node, (ast.For, ast.comprehension)):
            targets = [node.target]
        else:
            targets = []
        if any(_named_outcome(target) for target in targets):
            lines.append(getattr(node, "lineno", 0))
        if isinstance(node, ast.Call):
            function = node.func
            name = function.id if isinstance(function, ast.Name) else getattr(function, "attr", "")
            if name == "Ending":
                lines.append(node.lineno)
    return lines


def test_only_the_ending_table_assigns_an_outcome():
    found = {name: lines for name, tree in modules().items() if (lines := outcome_assignments(tree))}
    assert set(found) == {"jarvis/endings.py"}, found


def test_the_outcome_check_sees_every_way_of_assigning_one():
    """It would fail: each of these, in any module, is found."""
    for source in ["self.outcome = 'complete'", "outcome = Outcome.COMPLETE", "x.y.outcome: str = 'a'",
                   "a, self.outcome = 1, 2", "ending = Ending(Outcome.COMPLETE, 20, 'complete', None)",
                   "if (outcome := 1): pass", "for outcome in []: pass"]:
        assert outcome_assignments(ast.parse(source)), source
    assert outcome_assignments(ast.parse("ending = decide(happened)\nlabel = ending.outcome.value")) == []
def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def imports_of(tree: ast.Module) -> set[str]:
    """The jarvis modules a module imports, at any depth of its code (a lazy import is still an edge);
    `from jarvis import streams` is an edge to jarvis.streams."""
    found = set()
    type_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue  # an import for type annotations only never runs
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("jarvis"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jarvis"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _is_module(submodule) else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path, tree in modules().items():
        name = path[:-3].replace("/", ".").removesuffix(".__init__")
        # A package's __init__ choosing one of its own modules (backends/: create_backend) is dispatch,
        # not a dependency: its modules may import the package's shared names.
        graph[name] = {imported for imported in imports_of(tree)
                       if imported != name and not (path.endswith("__init__.py") and imported.startswith(name + "."))}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with the path."""
    found = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for following in graph.get(node, ()):
                if following == start:
                    found.append(path + [start])
                elif following not in seen:
                    seen.add(following)
                    stack.append((following, path + [following]))
    return found


def test_the_package_imports_have_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"jarvis.a": {"jarvis.b"}, "jarvis.b": {"jarvis.c"}, "jarvis.c": {"jarvis.a"}})
    assert cycles({"jarvis.a": {"jarvis.b"}, "jarvis.b": set()}) == []
