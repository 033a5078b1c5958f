"""What /proc says about a process (Linux): the benchmarks' CPU accounting."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # "R", "S", ... "Z" for a zombie (exited, not reaped yet)
    ppid: int
    cpu_s: float  # user + system so far


def proc_stat(pid: int | str) -> ProcStat:
    """Raises OSError when the process is gone."""
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return ProcStat(
        int(pid),
        fields[0],
        int(fields[1]),
        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
    )
