"""No import cycles between hybrid_ppo's modules, nor between its subpackages (`roles`, `rollout`,
`algo`, ... and the top-level modules), and no import against the layer order (README, "How it is
built"), read from the source (AST), so a new one fails here.

Counted: imports that run when a module is imported (module level, also under `try:` or an
`if`). Not counted: imports inside functions, the package's way of deferring a heavy or upward
import until it is used (e.g. errors.py reaching the executor only when formatting an error), and
those under `if TYPE_CHECKING:`, which never run (type hints only).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybrid_ppo"

# A cycle to be untangled may be listed here, one strongly connected component per entry, while it
# is; a cycle not listed, or a listed one that grows or is gone, fails the test.
KNOWN_MODULE_CYCLES: set[frozenset[str]] = set()
KNOWN_PACKAGE_CYCLES: set[frozenset[str]] = set()

LAYERS: list[list[str]] = [
    ["errors", "algo.types", "atomic_file", "build_locks", "progress", "samples", "seeding", "special_tokens", "stopping"],  # leaves: stdlib only
    ["config"],
    ["compat", "ops", "algo", "ptx", "checkpoint", "tasks", "data", "placement", "memory", "metrics", "rewards",
     "wandb_run"],
    ["executor", "role_process"],  # how role processes start, and what each one shares
    ["rollout"],  # engines and the weight-sync protocol
    ["roles"],  # actor (the sender of a weight sync), critic, reference, reward model
    ["trainer"],
    ["launch", "profile_run"],
    ["cli"],
]
"""Bottom to top, as in the README: a module imports only from its own layer or the ones below it.
An entry names a module or a package (all its modules); the longest entry that matches wins."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(tree: ast.Module, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The hybrid_ppo modules (names without the `hybrid_ppo.` prefix) this module imports at import time."""
    found: set[str] = set()

    def add(target: str) -> None:
        if target.startswith("hybrid_ppo."):
            target = target[len("hybrid_ppo."):]
        elif target == "hybrid_ppo":
            target = ""
        else:
            return
        while target and target not in known:  # `from a.b import c` where c is a name in a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(["hybrid_ppo", *[b for b in base if b], *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                for alias in node.names:  # `from hybrid_ppo.tasks import warmup` imports the module
                    add(f"{module}.{alias.name}" if f"{module}.{alias.name}"[len("hybrid_ppo."):] in known else module)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): module_level_imports(ast.parse(p.read_text()), module_name(p), p.name == "__init__.py",
                                                 known)
            for p in paths}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph with each subpackage collapsed to one node (`roles.actor` -> `roles`)."""
    packages: dict[str, set[str]] = {}
    for module, imports in graph.items():
        top = module.split(".")[0]
        packages.setdefault(top, set()).update(i.split(".")[0] for i in imports if i.split(".")[0] != top)
    return packages


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def layer_of(module: str) -> int:
    matches = [(len(entry), i) for i, layer in enumerate(LAYERS) for entry in layer
               if module == entry or module.startswith(entry + ".")]
    assert matches, f"hybrid_ppo.{module} is in no layer: add it to LAYERS here and to the README's layer list"
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, imports in graph.items() if a for b in imports if layer_of(b) > layer_of(a))


def test_the_layer_check_finds_an_upward_import():
    assert upward_imports({"config": {"trainer"}, "trainer": {"config"}}) == [
        "config (layer 1) imports trainer (layer 6)"]
    assert layer_of("algo.types") < layer_of("config") < layer_of("algo.ppo")


def test_no_import_against_the_layer_order():
    assert not upward_imports(import_graph()), "\n".join(upward_imports(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def assert_only_known(found: list[frozenset[str]], known: set[frozenset[str]], what: str) -> None:
    new = set(found) - known
    assert not new, f"import cycle(s) between hybrid_ppo {what}: " + "; ".join(" <-> ".join(sorted(c)) for c in new)
    gone = known - set(found)
    assert not gone, f"cycle(s) between {what} no longer there, remove them from the known list: " + "; ".join(
        " <-> ".join(sorted(c)) for c in gone)


def test_the_import_reader_sees_real_imports():
    graph = import_graph()
    assert "algo.types" in graph["config"] and "config" in graph["tasks.warmup"]
    assert "config" not in graph["algo.estimators"]  # only under TYPE_CHECKING there
    assert "executor" not in graph["errors"]  # only inside a function there


def test_no_new_import_cycles_between_modules():
    assert_only_known(cycles(import_graph()), KNOWN_MODULE_CYCLES, "modules")


def test_no_new_import_cycles_between_subpackages():
    assert_only_known(cycles(package_graph(import_graph())), KNOWN_PACKAGE_CYCLES, "subpackages")
