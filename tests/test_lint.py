"""Lint and type checks as tests, so that CI (which runs pytest) runs them: `ruff check .` and `mypy`, each with
the project's configuration in pyproject.toml, from the repository root, with this interpreter's installs.

Both tools are in the `test` extra: if one is missing the test fails (it does not skip)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, f"ruff check . exited {result.returncode}:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing() -> None:
    result = _run("mypy")  # the files and the per-area strictness come from [tool.mypy]
    assert result.returncode == 0, f"mypy exited {result.returncode}:\n{result.stdout}{result.stderr}"
