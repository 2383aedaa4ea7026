"""The package's layers (shared/DESIGN.md, written as an import-linter contract in pyproject.toml): imports
only point down, and no module imports another module's private names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rapid3"


def lint_imports(src: Path, config: Path) -> subprocess.CompletedProcess:
    """import-linter's verdict on the package under ``src`` (its own process: grimp reads files, not sys.modules)."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(config), "--no-cache"],
                          cwd=src, capture_output=True, text=True, env={"PYTHONPATH": str(src), "PATH": ""})


def test_the_layers_contract_is_kept():
    result = lint_imports(ROOT / "src", ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_that_points_up_breaks_the_contract(tmp_path):
    """The check is real: a backbone that imports the trainer fails it, naming the import."""
    shutil.copytree(PACKAGE, tmp_path / "rapid3", ignore=shutil.ignore_patterns("weights", "policies", "__pycache__"))
    sd3 = tmp_path / "rapid3" / "backbones" / "sd3.py"
    sd3.write_text(sd3.read_text() + "\nfrom ..train import trainer  # noqa: E402,F401\n")
    result = lint_imports(tmp_path, ROOT / "pyproject.toml")
    assert result.returncode != 0
    assert "rapid3.backbones is not allowed to import rapid3.train" in result.stdout


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("rapid3")):
                offenders += [f"{path.relative_to(PACKAGE)}: {node.module}.{alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not offenders, offenders
