"""Helper processes of a load (loader workers, the shared rate limit's manager) die with the
process that started them."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """Called first thing in a child process: the kernel kills it when its parent dies.

    A SIGKILLed backfill must not leave workers writing and checkpointing behind it (the
    resume would then skip chunks it never saw finish). Linux: prctl(PR_SET_PDEATHSIG)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody would signal us
        os._exit(1)
