"""The layers of the code hold, and `make lint` would notice if they stopped holding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("pipeline", "providers", "api", "tasks", "service")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(tree / ".importlinter"),
                           "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def tree(tmp_path):
    """A copy of the packages and the contracts, to break on purpose."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "celeryconfig.py", tmp_path)
    shutil.copy(ROOT / ".importlinter", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract(tree):
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("imported", ["providers.openai", "api.jobs", "tasks.app",
                                      "service.runtime"])
def test_lint_fails_when_the_core_imports_an_outer_layer(tree, imported):
    (tree / "pipeline" / "leak.py").write_text(f'"""A layer violation."""\n\nimport {imported}\n')
    result = _lint(tree)
    assert result.returncode != 0
    assert f"pipeline.leak -> {imported}" in result.stdout
