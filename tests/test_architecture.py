"""The layers of docs/architecture.md hold: no package imports a higher one.

    cli  ->  tune  ->  pipelines  ->  upsr, degradations

``upsr`` and ``degradations`` are siblings that never import each other, Ray or MLflow; ``tune``
reaches ``pipelines`` only through its public trial entry point, ``pipelines.trials``. Every
import statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"cli": 3, "tune": 2, "pipelines": 1, "upsr": 0, "degradations": 0}
FORBIDDEN = {
    "upsr": ("ray", "mlflow", "degradations", "pipelines", "tune", "cli"),
    "degradations": ("ray", "mlflow", "upsr", "pipelines", "tune", "cli"),
    "pipelines": ("tune", "cli"),
    "tune": ("cli",),
}


def imports(path: Path) -> list[str]:
    """Every module an import names: ``from a import b`` counts as ``a.b`` (b may be a module)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_higher_layer_or_a_forbidden_library(package):
    offending = [(path.name, name) for path in modules(package) for name in imports(path)
                 if name.split(".")[0] in FORBIDDEN[package]]
    assert not offending, f"{package} imports {offending}"


def test_tune_uses_only_the_public_trial_entry_point_of_pipelines():
    offending = [(path.name, name) for path in modules("tune") for name in imports(path)
                 if name.split(".")[0] == "pipelines" and not name.startswith("pipelines.trials.")
                 and name != "pipelines.trials"]
    assert not offending, offending


def test_the_layer_table_covers_every_package():
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS)
