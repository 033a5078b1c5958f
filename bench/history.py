"""A results file that keeps the previous run beside the current one, so a regression shows
(issue #13): ``{"current": ..., "previous": ...}`` as JSON, and its markdown beside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Render = Callable[[dict[str, Any], dict[str, Any] | None], str]


def save_with_previous(out: Path, result: dict[str, Any], render: Render) -> str:
    """Write ``result`` as the current run of ``out`` (the file's current run becoming its
    previous), and ``render(result, previous)`` to ``out`` with a .md suffix; returns that."""
    previous: dict[str, Any] | None = None
    if out.exists():
        data = json.loads(out.read_text())
        # A file from before this wrapper is the previous run itself.
        previous = data.get("current", data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"current": result, "previous": previous}, indent=2) + "\n")
    md = render(result, previous)
    out.with_suffix(".md").write_text(md)
    return md
