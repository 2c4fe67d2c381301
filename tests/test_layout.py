"""The package's shape, as the README's "Layout" draws it: imports run one way (the CLI above the tools, above the reports, above
the experiment chain, above the plug-ins, above the library, above bench.core), no module imports another
that imports it back, and no module outgrows ~400 lines."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# lowest first: a module may import from its own layer and the layers below it, never above
LAYERS = [
    ("core", ("bench", "bench._torchvision_cpu", "bench.core", "bench.configs")),
    ("data", ("bench.data",)),
    ("modeling", ("bench.modeling",)),
    ("train", ("bench.train",)),
    ("evaluation", ("bench.evaluation",)),
    ("plug-ins", ("bench.methods", "bench.datasets", "bench.evaluation.protocols")),
    ("experiment", ("bench.experiment",)),
    ("report", ("bench.report",)),
    ("tools", ("bench.tools",)),
    ("cli", ("bench.cli",)),
]
FOLDERS = {"bench.methods": "methods", "bench.datasets": "datasets", "bench.configs": "configs"}
MAX_LINES = 400
DATA_TABLES = {"bench.modeling.entities"}  # the entity lexicon: a table, not logic


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "bench").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every bench module `module` imports, at the top or inside a function, type-checking imports included."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from bench.x import y`: y is a module or a name in bench.x
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("bench"):
                found.add(name)
    return found


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_module_has_a_layer():
    assert [m for m in _modules() if _layer(m) < 0] == []


def test_imports_run_one_way():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in _graph().items() for d in sorted(deps)
              if _layer(d) > _layer(m) and not m.startswith(d + ".")]  # a package's __init__ is its module's parent
    assert upward == []


def test_no_import_circles():
    graph = _graph()
    circles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if module.startswith(dep + "."):  # importing a submodule runs its package's __init__: not a circle
                continue
            if state.get(dep) == "open":
                circles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_modules_stay_small():
    long = {m: n for m, p in _modules().items() if m not in DATA_TABLES
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_a_lower_layer_cannot_slip_through():
    """The check sees an upward import, a lazy one inside a function included."""
    known = {"bench.data.loading", "bench.experiment.setup"}
    source = REPO / "bench" / "data" / "loading.py"
    assert "bench.experiment.setup" not in _imports("bench.data.loading", source, known | set(_modules()))
    probe = Path(__import__("tempfile").mkdtemp()) / "probe.py"
    probe.write_text("def f():\n    from bench.experiment.setup import start\n")
    assert _imports("bench.data.probe", probe, known) == {"bench.experiment.setup"}
    assert _layer("bench.experiment.setup") > _layer("bench.data.probe")
