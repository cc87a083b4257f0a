"""The import layering of docs/architecture.md: trainer imports nothing of ours, evaluators only trainer, and
pipelines (which holds no ML logic) both; nothing imports the CLI, a face over functions that live elsewhere.
Read from the source with ast, so lazy imports inside functions count."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
OURS = {"trainer", "evaluators", "pipelines"}
ALLOWED = {"trainer": {"trainer"}, "evaluators": {"trainer", "evaluators"}, "pipelines": OURS}


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module the file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def imported_packages(path: Path) -> set[str]:
    """Top-level packages of ours that the module imports."""
    return {name.split(".")[0] for name in imported_modules(path)} & OURS


def test_the_checker_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from pipelines.cli import main\n    import evaluators.gate\n")
    assert imported_packages(module) == {"pipelines", "evaluators"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_its_layer_allows(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules
    wrong = {str(m.relative_to(ROOT)): sorted(imported_packages(m) - ALLOWED[package]) for m in modules}
    assert {m: w for m, w in wrong.items() if w} == {}


def test_no_module_imports_the_cli():
    modules = [m for package in sorted(ALLOWED) for m in sorted((ROOT / package).rglob("*.py"))]
    importers = [str(m.relative_to(ROOT)) for m in modules if "pipelines.cli" in imported_modules(m)]
    assert importers == []
