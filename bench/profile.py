"""Flame graphs of the three paths whose CPU issue #13 is about, taken with py-spy while their
benchmarks run: the dual-write step, the backfill's ``cql`` load, the CDC consumer.

    .venv/bin/python -m bench.profile [--paths dual-write backfill cdc] [--rate 100]

Writes ``bench/results/profile-<path>.svg`` (a flame graph: open it in a browser, click a frame
to zoom) and ``profile-<path>.md``: the frames holding the most samples, for a reader without
a browser and for comparing two runs. The profiled benchmarks write their figures to a
scratch directory, never over ``bench/results``: sampling slows them a little, so their
numbers are not the benchmark's.

py-spy samples from outside the process without pausing it (``--nonblocking``), every thread
and every child process (the backfill runs each stage in a process of its own). The driver's
compiled (Cython) parts show as the Python line that called them: ``_submit``'s share in the
backfill's graph is the driver's own request path. Needs the local stack (``make schemas``)
and py-spy (in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Final

RESULTS: Final = Path(__file__).resolve().parent / "results"

# What each path runs under the profiler; "{out}" is the scratch results file.
PATHS: Final[dict[str, list[str]]] = {
    "dual-write": ["bench.dual_write", "--calls", "1000", "--staleness-samples", "50"],
    "backfill": ["bench.backfill", "--turns", "100000", "--methods", "cql"],
    # One consumer process draining a backlog: its graph is the consumer's alone, not the
    # latency probes' of bench.cdc.
    "cdc": ["bench.cdc_scale", "--members", "1", "--turns", "50000"],
}

_TITLE: Final = re.compile(r"<title>(.*?) \(([\d,]+) samples?, [\d.]+%\)</title>")
# Plumbing every stack passes through (threads, imports, the benchmark's own loop), left out
# of the summary's table so the path's own frames lead it; the graph keeps them.
_PLUMBING: Final = re.compile(
    r"\((threading\.py|contextlib\.py|runpy\.py|<frozen [^)]*|concurrent/futures/[^)]*"
    r"|bench/[^)]*|multiprocessing/[^)]*):\d+\)$|^process \d+:|^<module> "
)


def frame_totals(svg: str) -> Counter[str]:
    """Samples per frame (function and file:line) summed over the graph: a frame's inclusive
    samples (a recursive frame counts once per level it appears at)."""
    totals: Counter[str] = Counter()
    for name, samples in _TITLE.findall(svg):
        totals[html.unescape(name)] += int(samples.replace(",", ""))
    return totals


def _commit() -> str:
    """The code profiled: the checkout's commit, marked when files other than the results
    (which a run itself rewrites) have local changes."""
    root = str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} with local changes" if changed else head


def summary(path: str, command: list[str], totals: Counter[str], top: int = 30) -> str:
    total = max(totals.values(), default=0)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Profile: {path}",
        "",
        f"`py-spy record --nonblocking --subprocesses -- python -m {' '.join(command)}`, "
        f"code {_commit()}, {when}; "
        f"{total:,} samples in the widest frame. Flame graph: `profile-{path}.svg`.",
        "",
        "Frames by inclusive samples, threads' and imports' plumbing and the benchmark's own "
        "loop left out; the share is of the widest frame (every sample of the run).",
        "",
        "| samples | share | frame (inclusive) |",
        "|---:|---:|---|",
    ]
    frames = [(name, n) for name, n in totals.most_common() if not _PLUMBING.search(name)]
    for name, n in frames[:top]:
        share = n / total if total else 0.0
        lines.append(f"| {n:,} | {share:.1%} | `{name}` |")
    return "\n".join(lines) + "\n"


def profile(path: str, rate: int, scratch: Path) -> Path:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is missing: pip install -e '.[dev]'")
    command = [*PATHS[path], "--out", str(scratch / f"{path}.json")]
    svg = RESULTS / f"profile-{path}.svg"
    subprocess.run(
        [
            py_spy,
            "record",
            "--nonblocking",
            "--subprocesses",
            "--rate",
            str(rate),
            "--format",
            "flamegraph",
            "--output",
            str(svg),
            "--",
            sys.executable,
            "-m",
            *command,
        ],
        check=True,
    )
    md = svg.with_suffix(".md")
    md.write_text(summary(path, command, frame_totals(svg.read_text())))
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=list(PATHS))
    ap.add_argument("--rate", type=int, default=100, help="samples per second")
    a = ap.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as scratch:
        for path in a.paths:
            print(profile(path, a.rate, Path(scratch)).read_text())


if __name__ == "__main__":
    main()
