"""The package's import structure: no import cycle among codi_jax modules, and imports inside functions only where
the module says why (config parsing before JAX starts, optional heavy dependencies)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "codi_jax")
# Modules whose function-level imports of codi_jax are deliberate, with the reason each gives in place.
DEFERRED = {
    "codi_jax.config": "configs are parsed (and their mistakes reported) before JAX starts",
    "codi_jax.main": "JAX and the trainer start only after the config is checked",
    "codi_jax.data.tokenizer": "the scene module is heavier than the tokenizer",
    "codi_jax.cli": "main --help answers at once, without the modules that import JAX",
    "codi_jax.sample": "sample --help and its input checks answer before JAX (and the model) load",
    "codi_jax.teacher": "a teacher folder is read before JAX starts; the builtin tokenizer is built only when named",
    "codi_jax.data": "the task table imports data.degradations and data.masks without JAX; the pipeline loads on use",
    "codi_jax.tasks.depth": "the task table is read before JAX starts; its metric loads the estimator when called",
    "codi_jax.tasks.sr": "the task table is read before JAX starts; its metric imports JAX when called",
    "codi_jax.tasks.inpaint": "the task table is read before JAX starts; its metrics and reference row import the "
                              "metrics package (JAX) when called",
}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _imports(tree: ast.Module):
    """(imported codi_jax names, at module level?) for every import statement."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        yield node, [n for n in names if n.startswith("codi_jax")], id(node) in top


def _graph():
    modules = _modules()

    def owner(name):  # the module a dotted name lives in ('codi_jax.models.unet.UNetConfig' -> ...unet)
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    graph, deferred = {}, {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        edges = set()
        for node, names, at_top in _imports(tree):
            targets = {owner(n) for n in names} - {None, name}
            # importing a.b.c runs a/__init__ and a/b/__init__ first; a module's own parent packages are already
            # importing when it runs, so edges to them are not cycles
            targets |= {p for t in targets for p in _parents(t) if p in modules}
            targets = {t for t in targets if t != name and not name.startswith(t + ".")}
            if at_top:
                edges |= targets
            elif targets:
                deferred.setdefault(name, []).append(node.lineno)
        graph[name] = edges
    return graph, deferred


def _parents(name):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_cycle():
    graph, _ = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "codi_jax.recipes" in graph["codi_jax.train"]  # the scan sees module-level imports at all


def test_function_level_imports_of_the_package_are_the_deliberate_ones():
    _, deferred = _graph()
    assert set(deferred) <= set(DEFERRED), {k: v for k, v in deferred.items() if k not in DEFERRED}
