"""Imports inside server/ point one way: the endpoints and their helpers import server/state.py, never app.py."""

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "dsserve" / "server"
ABOVE_APP = {"launch.py"}  # starts the app: the one module that may import app.py


def _server_imports(path: Path):
    """(module imported, whether the import sits inside a function) for each dsserve.server import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsserve.server"):
            names = [node.module] if node.module != "dsserve.server" else [f"dsserve.server.{a.name}" for a in node.names]
            for name in names:
                yield name, id(node) in nested


def test_no_server_module_imports_the_app_and_none_imports_a_sibling_lazily():
    """A lazy import inside a function is how a cycle hides: app.py <-> the endpoint modules had one."""
    wrong = []
    for path in sorted(SERVER.glob("*.py")):
        for module, is_lazy in _server_imports(path):
            if module == "dsserve.server.app" and path.name not in ABOVE_APP:
                wrong.append(f"{path.name} imports {module}")
            if is_lazy:
                wrong.append(f"{path.name} imports {module} inside a function")
    assert wrong == []
