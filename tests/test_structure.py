"""The package's shape: imports flow one way (no circles, no arrow back up a layer, no other module's private names),
and no module outgrows a screenful of contents. Every import counts, including those inside functions."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "melafast"

# lowest first: a module may import from its own layer and the ones before it, never from a later one
LAYERS = (
    ("foundation", ("melafast", "melafast.errors", "melafast.atomic", "melafast.config", "melafast.layout",
                    "melafast.processes", "melafast.progress", "melafast.metrics")),
    ("data", ("melafast.data",)),
    ("model", ("melafast.model",)),
    ("run folder", ("melafast.record", "melafast.runfolder")),
    ("inference", ("melafast.inference",)),
    ("evaluate", ("melafast.evaluate",)),
    ("train", ("melafast.train",)),
    ("deploy", ("melafast.deploy", "melafast.onnx")),
    ("cli", ("melafast.cli", "melafast.__main__")),
)
MAX_LINES = 350


def _modules() -> dict:
    "module name -> path, for every .py file of the package."
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    for rank, (_, roots) in enumerate(LAYERS):
        if any(module == r or module.startswith(r + ".") for r in roots if r != "melafast") or module == "melafast":
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")


def _imports(module: str, path: Path):
    """(imported melafast module, imported name or None, line) for every import statement of `module`, wherever it
    sits (functions included); `from package import submodule` counts as importing the submodule."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "melafast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "melafast":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno)


def _graph() -> dict:
    graph = {}
    for module, path in MODULES.items():
        graph[module] = {}
        for target, _, line in _imports(module, path):
            while target not in MODULES:
                target = target.rsplit(".", 1)[0]
            if target != module:
                graph[module].setdefault(target, line)
    return graph


def _cycles(graph: dict) -> list:
    "Strongly connected components of more than one module (Tarjan)."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_inside_functions_and_relative_ones():
    graph = _graph()
    assert "melafast.inference.predictor" in graph["melafast.inference.predict"]  # imported inside a function
    assert "melafast.data.columns" in graph["melafast.data.blocks"]  # `from .columns import ...` at the top
    # and a made-up circle is found
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_no_import_points_back_up_a_layer():
    back = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]}) at line {line}"
            for m, targets in _graph().items() for t, line in targets.items() if _layer(t) > _layer(m)]
    assert back == []


def test_no_module_imports_another_modules_private_names():
    found = [f"{m}:{line} imports {name} from {t}" for m, p in MODULES.items() for t, name, line in _imports(m, p)
             if name and name.startswith("_") and not name.startswith("__")]
    assert found == []


def test_the_onnx_runtime_imports_nothing_from_melafast():
    "It ships beside an export and runs where melafast (and torch) is not installed."
    assert list(_imports("melafast.onnx", MODULES["melafast.onnx"])) == []


def test_no_compatibility_shims():
    "No module answers for names that live elsewhere (a module-level __getattr__) except the lazy top level."
    shims = [m for m, p in MODULES.items() if m != "melafast" and any(
        isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)]
    assert shims == []


def test_no_module_re_exports_another_modules_names():
    "A module's __all__ lists what it defines; a package's __init__ may gather its own modules' names, not others'."
    found = []
    for module, path in MODULES.items():
        if module == "melafast":  # the public API: lazy names from every layer, by design
            continue
        tree = ast.parse(path.read_text())
        names = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)), [])
        if path.name == "__init__.py":  # its own submodules' names only
            own = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1
                   for a in n.names}
            found += [f"{module}: {x}" for x in names if x not in own]
            continue
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        defined |= {e.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) for e in ast.walk(t)
                    if isinstance(e, ast.Name)}
        found += [f"{module}: {x}" for x in names if x not in defined]
    assert found == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_stays_within_a_screenful_of_contents(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines: split it by concern"
