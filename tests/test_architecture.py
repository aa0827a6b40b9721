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
    "runner": 3,
    "backends": 4,  # the runner picks one; a backend knows the layers it accelerates
    "models": 5,
    "layers": 6,
}
ANYWHERE = {"config", "options", "errors", "assets", "profiling"}  # imported from any layer; they import nothing above themselves
# Operator tools read configs and checkpoints, never the engine or the device.
TOOLS = {"plan", "weights", "mindie", "doctor"}
# backends.cpu.kernels: the doctor asks it which CPU kernels this machine can run.
TOOL_ALLOWED = {"config", "options", "errors", "models.loader", "models.registry", "plan", "weights", "mindie",
                "backends.cpu.kernels"}


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
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno
            elif node.module:
                yield node.module, node.lineno


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
