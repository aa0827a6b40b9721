"""The import direction of docs/architecture.md, checked on every module: an arrow the wrong way fails."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dsserve"

# Rank of each layer: a module may import its own layer or any layer with a larger rank.
RANKS = {
    "cli": 0,
    "server": 1, "llm": 1, "bench": 1, "eval": 1, "chat": 1,
    "plan": 1, "weights": 1, "mindie": 1, "doctor": 1,
    "engine": 2,
    "reasoning": 2,  # text-level parsing the server uses; imports no engine or HTTP types
    "tool_parsers": 2,  # the same for tool calls
    "runner": 3,
    "backends": 4,  # the runner picks one; a backend knows the layers it accelerates
    "models": 5,
    "layers": 6,
    # the number formats quantized weights are held in (formats/quantization.py: schemes, quantizing, the plain-torch
    # twins) and the published checkpoint formats that carry them (formats/quantized.py: read by the loader, written
    # by `weights quantize`): data formats beside the layers' maths rather than part of the engine core
    "formats": 6,
}
ANYWHERE = {"config", "options", "errors", "assets", "profiling"}  # imported from any layer; they import nothing above themselves
# Operator tools read configs and checkpoints, never the engine or the device.
TOOLS = {"plan", "weights", "mindie", "doctor"}
# backends.cpu.kernels: the doctor asks it which CPU kernels this machine can run. formats: `weights quantize`
# writes the integers the CPU packer holds, in a format the loader reads.
TOOL_ALLOWED = {"config", "options", "errors", "models.loader", "models.registry", "plan", "weights", "mindie",
                "backends.cpu.kernels", "formats"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def _imports(module: str, path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                source = node.module
            else:
                continue
            for alias in node.names:  # `from package import module` imports that module
                submodule = f"{source}.{alias.name}"
                yield (submodule if _is_module(submodule) else source), node.lineno


def _is_module(name: str) -> bool:
    if not name.startswith("dsserve."):
        return False
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _violations():
    found = []
    for module, path in _modules():
        src = _layer(module)
        if src in ("", "__main__"):
            continue  # the package facade re-exports the offline API
        for target, line in _imports(module, path):
            if not target.startswith("dsserve.") or _layer(target) == src:
                continue
            dst = _layer(target)
            if src in TOOLS:
                if not any(target == a or target.startswith(f"dsserve.{a}") for a in TOOL_ALLOWED):
                    found.append(f"{path.name}:{line} {module} -> {target} (tools use config and models.loader only)")
                continue
            if dst in ANYWHERE:
                if src in ANYWHERE and dst != "config" and dst != "errors":
                    found.append(f"{path.name}:{line} {module} -> {target}")
                continue
            if src in ANYWHERE:
                found.append(f"{path.name}:{line} {module} -> {target} ({src} may import only config/errors)")
                continue
            if src not in RANKS or dst not in RANKS:
                found.append(f"{path.name}:{line} {module} -> {target}: layer {src or dst!r} is not in docs/architecture.md")
            elif RANKS[dst] < RANKS[src]:
                found.append(f"{path.name}:{line} {module} -> {target} points up ({src} -> {dst})")
    return found


def test_imports_point_down():
    assert _violations() == []


def test_checker_catches_an_upward_arrow(tmp_path, monkeypatch):
    fake = tmp_path / "dsserve"
    (fake / "layers").mkdir(parents=True)
    (fake / "engine").mkdir()
    (fake / "layers" / "bad.py").write_text("from dsserve.engine.scheduler import Scheduler\n")
    (fake / "engine" / "ok.py").write_text("from dsserve.layers.bad import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _violations() == ["bad.py:1 dsserve.layers.bad -> dsserve.engine.scheduler points up (layers -> engine)"]


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()))
def test_every_package_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc, f"dsserve/{package}/__init__.py needs a one-line docstring saying what it owns"


def test_the_cli_and_the_benchmark_client_do_not_import_torch():
    """Every CLI command imports `dsserve`; the `bench serve` client runs beside the server it measures. Neither
    should pay torch's import (~2 CPU-seconds) unless it computes."""
    import subprocess
    import sys

    code = ("import sys, dsserve, dsserve.cli, dsserve.bench.serve, dsserve.bench.timing; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the package modules it imports (at module level only, or anywhere in it)."""
    modules = dict(_modules())
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        lines = {n.lineno for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))}
        graph[module] = {target for target, line in _imports(module, path)
                         if line in lines and target in modules and target != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or through others, even inside functions (a lazy import that
    dodges a cycle is still one). A package's __init__ re-exporting its submodules is not an arrow back."""
    graph = _import_graph(top_level_only=False)
    for module in graph:  # a submodule importing its package's facade is the facade's business, not a cycle
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_models_and_layers_know_no_backend():
    """The model files and layers are the maths: no backend, no kernel, no ctypes."""
    found = []
    for module, path in _modules():
        if _layer(module) in ("models", "layers"):
            found += [f"{module} -> {target}" for target, _ in _imports(module, path)
                      if target.startswith(("dsserve.backends", "ctypes"))]
    assert found == []


ENGINE_CORE = ("engine", "runner", "models", "layers")


def test_engine_core_stays_small():
    """The engine, runner, models and layers of the four architectures (backends excluded) in at most 4,000 lines."""
    lines = sum(len(path.read_text().splitlines()) for package in ENGINE_CORE
                for path in (PACKAGE / package).rglob("*.py"))
    assert lines <= 4000, f"the engine core has {lines} lines"


def test_tests_use_no_other_package_private_names():
    """A test imports a private (underscore) name only from the package it tests (tests/<package>/ mirrors it)."""
    tests = PACKAGE.parent / "tests"
    found = []
    for path in sorted(tests.rglob("*.py")):
        rel = path.relative_to(tests)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem.removeprefix("test_")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dsserve"):
                package = (node.module.split(".") + [""])[1]
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and package != own:
                    found.append(f"{rel}:{node.lineno} imports {', '.join(private)} from {node.module}")
    assert found == []
