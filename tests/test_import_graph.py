"""The package's import graph, read from the source with `ast` (every import, also those inside
functions): values flow one way, so the graph has no cycle, no module imports one of our own
modules inside a function (a hidden cycle or an upward reach), and no module imports from a layer
above its own. Only heavy optional dependencies may be imported lazily, each with a comment."""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gtpo_jax"

# Lowest first. A module belongs to the first layer with an entry equal to its name or a package
# prefix of it; it may import its own layer and the layers below, never one above.
LAYERS = [
    ("foundation", ["gtpo_jax", "gtpo_jax.logs", "gtpo_jax.cli", "gtpo_jax.config_loader", "gtpo_jax.config_checks",
                    "gtpo_jax.distributed", "gtpo_jax.run_lock", "gtpo_jax.export_dir", "gtpo_jax.metrics",
                    "gtpo_jax.sharding", "gtpo_jax.rounding"]),
    ("model", ["gtpo_jax.model"]),
    ("model files", ["gtpo_jax.hf_io", "gtpo_jax.checkpoint", "gtpo_jax.conversion"]),
    ("data and rewards", ["gtpo_jax.data", "gtpo_jax.rewards"]),
    ("sampling", ["gtpo_jax.sampling"]),
    ("layout", ["gtpo_jax.layout", "gtpo_jax.packing"]),
    ("losses", ["gtpo_jax.losses"]),
    ("trajectory", ["gtpo_jax.trajectory"]),
    ("config tree", ["gtpo_jax.config", "gtpo_jax.memory_plan"]),
    ("rollout", ["gtpo_jax.rollout"]),
    ("evaluation", ["gtpo_jax.evaluate"]),
    ("trainers", ["gtpo_jax.trainers"]),
    ("entry points", ["gtpo_jax.train", "gtpo_jax.plan", "gtpo_jax.plan_costs", "gtpo_jax.plan_report"]),
]

# Third-party modules that may be imported inside a function: GPU-only or optional extras that a
# CPU install lacks, or that cost seconds to import for a code path few runs take. The import line
# must say why in a comment.
LAZY_ALLOWED = ("lmdeploy", "torch", "wandb", "pyarrow", "math_verify", "jax.experimental.pallas")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, modules) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function or class, source line) for every import statement;
    `from pkg import sub` counts as an import of `pkg.sub` when that is one of our modules."""
    source = path.read_text()
    lines = source.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base_name = ".".join(base + ([child.module] if child.module else []))
                else:
                    base_name = child.module
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in modules else base_name
                           for a in child.names]
            else:
                visit(child, inner)
                continue
            for target in dict.fromkeys(targets):
                found.append((target, child.lineno, nested, lines[child.lineno - 1]))
    visit(ast.parse(source), False)
    return found


def layer_of(name: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or (p != "gtpo_jax" and name.startswith(p + ".")) for p in prefixes):
            return index
    return None


def own(target: str) -> bool:
    return target == "gtpo_jax" or target.startswith("gtpo_jax.")


def graph_problems(modules: dict[str, pathlib.Path]) -> list[str]:
    problems = []
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        if layer_of(name) is None:
            problems.append(f"{name} is in no layer: add it to LAYERS in tests/test_import_graph.py")
        for target, line, nested, text in imports_of(name, path, modules):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if own(target):
                if target not in modules:
                    problems.append(f"{where}: imports {target}, which is no module of gtpo_jax")
                    continue
                if nested:
                    problems.append(f"{where}: imports {target} inside a function; import it at the top of the "
                                    "file (a cycle or an upward import is what such an import usually hides)")
                if target != name:
                    edges[name].add(target)
                low, high = layer_of(target), layer_of(name)
                if low is not None and high is not None and low > high:
                    problems.append(f"{where}: {name} (layer {LAYERS[high][0]!r}) imports {target} from the higher "
                                    f"layer {LAYERS[low][0]!r}")
            elif nested and not (target.startswith(LAZY_ALLOWED) and "#" in text):
                problems.append(f"{where}: imports {target} inside a function; import it at the top of the file "
                                "(only LAZY_ALLOWED modules may be imported lazily, with a comment saying why)")
    return problems + [f"import cycle: {' -> '.join(cycle)}" for cycle in find_cycles(edges)]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (iterative Tarjan, then a path)."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def strongconnect(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    cycles = []
    for group in groups:
        start = min(group)
        path, seen, node = [start], {start}, start
        while True:  # walk inside the group until a module repeats
            node = min(t for t in edges[node] if t in group)
            if node in seen:
                cycles.append(path[path.index(node):] + [node])
                break
            path.append(node)
            seen.add(node)
    return cycles


def test_import_graph_is_layered_acyclic_and_at_the_top():
    problems = graph_problems(read_modules())
    assert not problems, "\n".join(problems)


def test_the_checker_sees_cycles_local_imports_and_upward_imports(tmp_path, monkeypatch):
    """The checker itself, on a made-up package: each kind of fault is reported."""
    pkg = tmp_path / "gtpo_jax"
    (pkg / "rollout").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layout.py").write_text("from gtpo_jax import losses\n")
    (pkg / "losses.py").write_text("import gtpo_jax.layout\n")  # cycle layout <-> losses (+ layout imports up)
    (pkg / "model.py").write_text("def f():\n    from gtpo_jax.rollout import base\n")  # local and upward
    (pkg / "rollout" / "__init__.py").write_text("")
    (pkg / "rollout" / "base.py").write_text("def g():\n    import numpy\n")
    (pkg / "extra.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    problems = "\n".join(graph_problems(read_modules()))
    assert "import cycle: gtpo_jax.layout -> gtpo_jax.losses -> gtpo_jax.layout" in problems
    assert "model.py:2: imports gtpo_jax.rollout.base inside a function" in problems
    assert "gtpo_jax.model (layer 'model') imports gtpo_jax.rollout.base from the higher layer 'rollout'" in problems
    assert "layout.py:1: gtpo_jax.layout (layer 'layout') imports gtpo_jax.losses" in problems
    assert "rollout/base.py:2: imports numpy inside a function" in problems
    assert "gtpo_jax.extra is in no layer" in problems
