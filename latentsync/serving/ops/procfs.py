"""A process's resources as ``/proc`` reports them: descriptors by kind, threads, resident memory.

What a long-running server must give back after each task, client or upload (tests/serving/test_leaks.py,
scripts/bench/soak_bench.py): a descriptor that stays open per task runs a 24/7 server out of
descriptors within a day. Linux only (``proc(5)``).
"""

from __future__ import annotations

import collections
import os
import stat


def descriptor_kinds(pid: int | str = "self") -> dict[str, int]:
    """Open descriptors of a process counted by kind.

    Kinds: ``pipe``, ``socket``, ``fifo`` (a named FIFO), ``anon:<name>`` (an anonymous inode:
    ``anon:eventfd``, ``anon:[eventpoll]`` ...), ``dev`` (under ``/dev``), ``file`` (anything else on a
    filesystem). A descriptor closed while it is read is skipped.

    Args:
        pid: The process id, or ``"self"``.

    Returns:
        Kind -> count; empty if the process is gone.
    """
    counts: collections.Counter[str] = collections.Counter()
    folder = f"/proc/{pid}/fd"
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    for name in names:
        try:
            target = os.readlink(f"{folder}/{name}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            counts["pipe"] += 1
        elif target.startswith("socket:"):
            counts["socket"] += 1
        elif target.startswith("anon_inode:"):
            counts["anon:" + target.split(":", 1)[1]] += 1
        elif target.startswith("/dev/"):
            counts["dev"] += 1
        else:
            try:
                fifo = stat.S_ISFIFO(os.stat(f"{folder}/{name}").st_mode)
            except OSError:
                fifo = False
            counts["fifo" if fifo else "file"] += 1
    return dict(counts)


def status_fields(pid: int | str = "self") -> dict[str, str]:
    """The ``Name: value`` lines of ``/proc/<pid>/status`` (``Threads``, ``VmRSS`` ...); empty if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def thread_count(pid: int | str = "self") -> int:
    """Threads of a process (0 if it is gone)."""
    return int(status_fields(pid).get("Threads", "0"))


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MiB (``VmRSS``; 0 if it is gone)."""
    return int(status_fields(pid).get("VmRSS", "0 kB").split()[0]) / 1024
