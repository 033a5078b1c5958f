"""The layers' import rules (docs/architecture.md, "Layers and import rules").

The rules are import-linter contracts in pyproject.toml (``[tool.importlinter]``); this test
runs them on the tree, and on a scratch copy of it with deliberately wrong imports, each of
which must be reported, so contracts made toothless (a layer renamed, a contract dropped)
fail too.
Imports inside functions, relative imports and ``if TYPE_CHECKING:`` imports all count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pyproject.toml"
ROOT_PACKAGES: list[str] = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"][
    "root_packages"
]
_LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run the contracts on the packages under ``root`` (a fresh interpreter, so the packages
    are the ones found there, not those this process imported)."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", _LINT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_the_import_rules() -> None:
    proc = lint_imports(ROOT)
    if proc.returncode != 0:
        pytest.fail(f"import rules broken (lint-imports):\n{proc.stdout}{proc.stderr}")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A copy of the project's Python packages and pyproject.toml."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {
            n
            for n in names
            if n.startswith(".")
            or n == "__pycache__"
            or (not n.endswith(".py") and not (Path(directory) / n).is_dir())
        }

    for package in ROOT_PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(CONFIG, tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, code: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + code)


WRONG_IMPORTS = {
    # A path importing another path, inside a function.
    "path-to-path": (
        "tasks/backfill/__init__.py",
        "def _offsets():\n    from tasks.cdc import offsets\n\n    return offsets\n",
        "tasks.backfill is not allowed to import tasks.cdc",
    ),
    # Core importing an adapter, relatively.
    "core-to-adapter": (
        "tasks/core/__init__.py",
        "from ..adapters import scylla  # noqa\n",
        "tasks.core is not allowed to import tasks.adapters",
    ),
    # Core importing the settings.
    "core-to-settings": (
        "tasks/core/__init__.py",
        "from tasks import settings  # noqa\n",
        "tasks.core is not allowed to import tasks.settings",
    ),
    # Settings importing an adapter.
    "settings-to-adapter": (
        "tasks/settings.py",
        "import tasks.adapters.postgres  # noqa\n",
        "tasks.settings is not allowed to import tasks.adapters",
    ),
    # An adapter importing a path, for type checking only.
    "adapter-to-path": (
        "tasks/adapters/__init__.py",
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        "    from tasks.dual_write import service  # noqa\n",
        "tasks.adapters is not allowed to import tasks.dual_write",
    ),
    # The product importing demo support.
    "product-to-support": (
        "tasks/audit/__init__.py",
        "import support  # noqa\n",
        "tasks is not allowed to import support",
    ),
    # A module under tasks/ that belongs to no layer.
    "module-without-layer": (
        "tasks/helpers.py",
        "X = 1\n",
        "- tasks.helpers\n",
    ),
}


@pytest.mark.slow
def test_each_wrong_import_breaks_a_contract(scratch: Path) -> None:
    # One run over one scratch copy holding every wrong import (a run per import would cost a
    # second each): each must be reported on its own.
    clean = lint_imports(scratch)
    assert clean.returncode == 0, f"the scratch copy must start clean:\n{clean.stdout}"
    for path, code, _ in WRONG_IMPORTS.values():
        _append(scratch / path, code)
    proc = lint_imports(scratch)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    missed = [case for case, (_, _, message) in WRONG_IMPORTS.items() if message not in proc.stdout]
    assert not missed, f"not reported: {missed}\n{proc.stdout}{proc.stderr}"
