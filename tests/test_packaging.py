"""What the package declares: every import, and a base set the bento can serve with."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_ONLY = {"dvc", "great_expectations", "optuna", "psycopg2", "sqlalchemy"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def _imported_modules(files) -> set[str]:
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"pap_severity", "__future__"}


def test_every_third_party_import_of_the_package_is_declared():
    project = _project()
    declared = _names(project["dependencies"]) | _names(project["optional-dependencies"]["pipeline"])
    dists = packages_distributions()
    files = [*(ROOT / "src").rglob("*.py"), ROOT / "bento" / "service.py"]
    missing = {m: dists.get(m) for m in _imported_modules(files)
               if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_pins_live_in_constraints_and_ranges_in_pyproject():
    for req in _project()["dependencies"]:
        assert "==" not in req, f"{req}: exact pins belong in constraints.txt"
    pinned = {line.split("==")[0].lower() for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert {"torch", "torchvision", "mlflow", "bentoml"} <= pinned


def test_the_base_set_leaves_the_pipeline_tools_to_the_extra():
    base = _names(_project()["dependencies"])
    assert not base & {"dvc", "great-expectations", "optuna", "psycopg2-binary", "coral-pytorch"}
    assert "coral-pytorch" in _names(_project()["optional-dependencies"]["dev"])


def test_the_bento_service_imports_none_of_the_pipeline_tools():
    code = ("import sys; sys.path.insert(0, 'bento'); import service; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(PIPELINE_ONLY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
