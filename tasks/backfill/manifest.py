"""A snapshot's manifest (``manifest.json``): when and how the snapshot was taken (time, WAL
position, CDC slot, filter) and its chunk files with their row counts. Written last and
atomically: a folder with a manifest is a complete snapshot, one without is not."""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from tasks.backfill.plan import SnapshotFilter
from tasks.core.errors import ConfigurationError

MANIFEST: Final = "manifest.json"
FORMAT_VERSION: Final = 1


@dataclass
class ChunkFile:
    id: str
    table: str
    index: int
    lo: str | None
    hi: str | None
    rows: int
    file: str
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class Manifest:
    snapshot_id: str
    snapshot_time: str
    wal_lsn: str
    slot: dict[str, Any]
    filter: dict[str, Any]
    read_models: list[str]
    chunk_size: int
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # table -> {rows}
    chunks: list[ChunkFile] = field(default_factory=list)
    seconds: float = 0.0
    format: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def taken_at(self) -> datetime:
        return datetime.fromisoformat(self.snapshot_time)

    def write(self, directory: Path) -> Path:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, directory / MANIFEST)  # atomic: a manifest means a complete snapshot
        return directory / MANIFEST

    @classmethod
    def read(cls, directory: Path | str) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ConfigurationError(
                f"{directory} is not a complete snapshot (no {MANIFEST}); "
                f"a snapshot interrupted before its manifest cannot be "
                f"resumed: take a new one"
            )
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigurationError(
                f"{path} is not a readable snapshot manifest ({exc}): take a new snapshot"
            ) from None
        if not isinstance(d, dict):
            raise ConfigurationError(
                f"{path} is not a snapshot manifest: a JSON object was "
                f"expected, got {type(d).__name__}"
            )
        if d.get("format") != FORMAT_VERSION:
            raise ConfigurationError(
                f"{path}: snapshot format {d.get('format')} is not {FORMAT_VERSION}"
            )
        try:
            d["chunks"] = [ChunkFile(**c) for c in d["chunks"]]
            manifest = cls(**d)
            datetime.fromisoformat(manifest.snapshot_time)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{path} is not a complete snapshot manifest (missing or "
                f"malformed field: {exc!r}): take a new snapshot"
            ) from None
        return manifest


def find_resumable(
    root: Path | str, filt: SnapshotFilter, read_models: Collection[str]
) -> Path | None:
    """The newest complete snapshot under ``root`` taken with the same filter and for (at
    least) the same read models: what a crashed run with these parameters left."""
    root = Path(root)
    if not root.is_dir():
        return None
    for d in sorted((x for x in root.iterdir() if (x / MANIFEST).is_file()), reverse=True):
        m = Manifest.read(d)
        if m.filter == filt.to_json() and set(read_models) <= set(m.read_models):
            return d
    return None
