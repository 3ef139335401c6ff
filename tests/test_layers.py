"""The architecture as written down in pyproject.toml's import-linter contracts: the rooms in
layers (the CLI, the demo, then inference | streams | sinks | reports beside each other, infra,
schemas, settings, errors), no import cycle between the modules of a room (imports inside
functions count), and no production module over 500 lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# top-level folders assembled into the package by [tool.setuptools.package-dir]
ROOMS = ("inference", "schemas", "streams", "sinks", "reports", "infra")
MAX_LINES = 500


def _assembled(tmp: Path) -> Path:
    """The package as one tree (tokenaudit/inference/..., tokenaudit/infra/...): import-linter
    finds a package's modules by walking its folder, and ours is assembled from six."""
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.c")
    shutil.copytree(ROOT / "tokenaudit", tmp / "tokenaudit", ignore=skip)
    for room in ROOMS:
        shutil.copytree(ROOT / room, tmp / "tokenaudit" / room, ignore=skip)
    return tmp


def test_import_contracts_hold(tmp_path):
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), "lint-imports (import-linter, a test dependency) is missing: run `make setup`"
    tree = _assembled(tmp_path)
    done = subprocess.run(
        [str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout[done.stdout.find("Contracts") :]
    assert done.returncode == 0, f"an import contract is broken:\n{report[-8000:]}\n{done.stderr[-2000:]}"
    assert "0 broken" in report and "2 kept" in report, report


def test_no_production_module_over_500_lines():
    long = {}
    for room in ("tokenaudit", *ROOMS):
        for path in (ROOT / room).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                long[str(path.relative_to(ROOT))] = lines
    assert not long, f"split these modules (at most {MAX_LINES} lines each): {long}"
