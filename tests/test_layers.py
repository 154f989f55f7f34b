"""The layering contracts of pyproject.toml ([tool.importlinter]), checked with import-linter.

export/ and kernels/ sit at the top of the repository and are mapped into valley_rt by package-dir at
install time, where grimp (import-linter's graph builder) cannot see them: the test stages the
installed layout (Python files only) in a temporary folder and runs `lint-imports` on it. A second
test puts a forbidden import into the staged runtime and checks the contract breaks, so the checker
is known to be looking.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def stage(root: Path) -> Path:
    """root/valley_rt with export/ and kernels/ inside, as installed; returns root."""
    skip = shutil.ignore_patterns("assets", "__pycache__", "*.pyc")
    shutil.copytree(REPO / "valley_rt", root / "valley_rt", ignore=skip)
    for sub in ("export", "kernels"):
        shutil.copytree(REPO / sub, root / "valley_rt" / sub, ignore=skip)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # the staged package before the editable install
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def staged(tmp_path):
    if not LINT.is_file():
        pytest.skip("import-linter is not installed (the `test` extra)")
    return stage(tmp_path)


def test_layering_contracts_are_kept(staged):
    out = lint(staged)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout or "broken" not in out.stdout.split("Contracts:")[-1]


def test_a_forbidden_import_breaks_the_contract(staged):
    runtime = staged / "valley_rt" / "runtime.py"
    runtime.write_text(runtime.read_text() + "\n\ndef _export():\n    from valley_rt.export.engine import export_engine\n")
    out = lint(staged)
    assert out.returncode != 0
    assert "The runtime side never imports the exporters" in out.stdout
    assert "valley_rt.runtime -> valley_rt.export.engine" in out.stdout
