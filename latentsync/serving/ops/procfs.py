"""Processes and threads as ``/proc`` reports them: state, parent, CPU time, threads, memory, descriptors, users.

What a long-running server must give back after each task, client or upload (tests/serving/test_leaks.py,
scripts/bench/soak_bench.py): a descriptor that stays open per task runs a 24/7 server out of
descriptors within a day. The tests and benches read children, CPU seconds and RSS of the server's
process tree here too, so ``/proc/<pid>/stat`` is parsed in one place. Linux only (``proc(5)``).

Every reader answers for a process that is gone (or goes while it is read) without raising: None,
0 or empty, as each says.
"""

from __future__ import annotations

import collections
import os
import stat
from dataclasses import dataclass
from typing import NamedTuple

#: Clock ticks per second of the ``utime``, ``stime`` and ``starttime`` fields (``USER_HZ``, 100 on Linux).
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
#: Bytes of a memory page (the unit of ``rss`` in ``/proc/<pid>/stat``).
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, kw_only=True)
class ProcStat:
    """One line of ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat`` (``proc(5)``), the fields we use.

    Attributes:
        pid: The process id (a thread's id for a thread's line).
        comm: The command name, at most 15 characters, as the process or thread set it (may hold
            spaces and parentheses).
        state: One letter: ``R`` running, ``S`` sleeping, ``D`` in an uninterruptible wait, ``T``
            stopped, ``t`` stopped by a tracer, ``Z`` zombie (ended, not reaped), ``X`` dead, ``I`` idle.
        ppid: The parent's process id (0 for the first process).
        utime_ticks: CPU time in user mode, in clock ticks (:data:`CLOCK_TICKS_PER_S`).
        stime_ticks: CPU time in kernel mode, in clock ticks.
        nice: Niceness, -20 (first) to 19 (last).
        num_threads: Threads of the process.
        starttime_ticks: When it started, in clock ticks after the boot (with ``pid``, it tells a
            reused pid from the process once known by it).
        rss_pages: Resident set size in pages (:data:`PAGE_BYTES`).
    """

    pid: int
    comm: str
    state: str
    ppid: int
    utime_ticks: int
    stime_ticks: int
    nice: int
    num_threads: int
    starttime_ticks: int
    rss_pages: int

    @property
    def cpu_s(self) -> float:
        """CPU time in user and kernel mode together, in seconds."""
        return (self.utime_ticks + self.stime_ticks) / CLOCK_TICKS_PER_S

    @property
    def rss_mb(self) -> float:
        """Resident set size in MiB."""
        return self.rss_pages * PAGE_BYTES / 2**20

    @property
    def alive(self) -> bool:
        """False for a zombie (``Z``, killed or ended but not reaped yet) or a dead (``X``) process."""
        return self.state not in ("Z", "X")


def parse_stat(line: str) -> ProcStat:
    """Parse one ``stat`` line: ``pid (comm) state ppid ...`` (``proc(5)``, fields numbered from 1).

    The command name may hold spaces and parentheses (a process names itself), so it runs from the
    first ``(`` to the LAST ``)``; the fields after it are split at whitespace.

    Args:
        line: The file's text.

    Returns:
        The parsed :class:`ProcStat`.

    Raises:
        ValueError: If the line does not have that shape.
    """
    head, paren, tail = line.rpartition(")")
    pid, open_paren, comm = head.partition(" (")
    fields = tail.split()
    if not paren or not open_paren or len(fields) < 22:
        raise ValueError(f"not a /proc stat line: {line[:80]!r}")
    # fields[i] is field i + 3: state (3), ppid (4), utime (14), stime (15), nice (19), num_threads (20),
    # starttime (22), rss (24).
    return ProcStat(
        pid=int(pid),
        comm=comm,
        state=fields[0],
        ppid=int(fields[1]),
        utime_ticks=int(fields[11]),
        stime_ticks=int(fields[12]),
        nice=int(fields[16]),
        num_threads=int(fields[17]),
        starttime_ticks=int(fields[19]),
        rss_pages=int(fields[21]),
    )


def read_stat(pid: int | str = "self", tid: int | None = None) -> ProcStat | None:
    """A process's ``/proc/<pid>/stat``, or one of its threads' ``/proc/<pid>/task/<tid>/stat``.

    Args:
        pid: The process id, or ``"self"``.
        tid: A thread id of that process (``threading.get_native_id()``); None: the whole process.

    Returns:
        The :class:`ProcStat` (a process's CPU times are those of all its threads); None if it is gone.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            return parse_stat(f.read())
    except (OSError, ValueError):
        return None


def process_state(pid: int | str = "self") -> str | None:
    """A process's state letter (:attr:`ProcStat.state`: ``R``, ``S``, ``T``, ``Z`` ...); None if it is gone."""
    found = read_stat(pid)
    return None if found is None else found.state


def is_alive(pid: int | str) -> bool:
    """True while the process exists and is not a zombie (killed, not yet reaped) nor dead."""
    found = read_stat(pid)
    return found is not None and found.alive


def cpu_seconds(pid: int | str = "self", tid: int | None = None) -> float:
    """CPU time (user + kernel) of a process, all its threads, or of one thread, in seconds; 0.0 if gone.

    Args:
        pid: The process id, or ``"self"``.
        tid: One of its threads (None: the whole process).
    """
    found = read_stat(pid, tid)
    return 0.0 if found is None else found.cpu_s


def process_stats() -> dict[int, ProcStat]:
    """The ``stat`` of every process (processes that end while they are read are left out), by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (one := read_stat(entry)) is not None:
            found[one.pid] = one
    return found


def thread_stats(pid: int | str = "self") -> dict[int, ProcStat]:
    """The ``stat`` of every thread of a process, by thread id (``comm`` is the thread's own name).

    Threads that end while they are read are left out; empty if the process is gone.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    found = {}
    for tid in tids:
        if tid.isdigit() and (one := read_stat(pid, int(tid))) is not None:
            found[one.pid] = one
    return found


def children(pid: int, stats: dict[int, ProcStat] | None = None) -> list[int]:
    """The processes whose parent is ``pid``, in pid order.

    Args:
        pid: The parent.
        stats: A :func:`process_stats` snapshot to read (None: one is taken).
    """
    stats = process_stats() if stats is None else stats
    return sorted(p for p, one in stats.items() if one.ppid == pid)


def descendants(pid: int, stats: dict[int, ProcStat] | None = None) -> list[int]:
    """Every process under ``pid`` (children, their children ...; not ``pid`` itself), nearest first.

    Args:
        pid: The root.
        stats: A :func:`process_stats` snapshot to read (None: one is taken).
    """
    stats = process_stats() if stats is None else stats
    by_parent: dict[int, list[int]] = collections.defaultdict(list)
    for p, one in sorted(stats.items()):
        by_parent[one.ppid].append(p)
    found: list[int] = []
    seen = {pid}
    todo = collections.deque([pid])
    while todo:
        for child in by_parent.get(todo.popleft(), ()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


def command_line(pid: int | str = "self") -> str:
    """A process's command line, its arguments joined by spaces (``/proc/<pid>/cmdline``); ``""`` if gone.

    A kernel thread's or a zombie's is ``""`` too.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").rstrip(" ")
    except OSError:
        return ""


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


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process in KiB (``VmRSS``; 0 if it is gone, or for a kernel thread)."""
    return int(status_fields(pid).get("VmRSS", "0 kB").split()[0])


def peak_rss_kib(pid: int | str = "self") -> int:
    """Highest resident set size a process has had so far, in KiB (``VmHWM``; 0 if it is gone).

    The kernel keeps it, so a peak between two reads is not missed; it starts afresh at ``exec``
    (a spawned child's counts its own memory only).
    """
    return int(status_fields(pid).get("VmHWM", "0 kB").split()[0])


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MiB (``VmRSS``; 0 if it is gone)."""
    return rss_kib(pid) / 1024


def tree_rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process and every process under it (:func:`descendants`), summed, in MiB.

    Pages two processes share (the FFmpeg binary, a forked parent's memory) count once for each.
    """
    root = read_stat(pid)
    if root is None:
        return 0.0
    return sum(rss_kib(p) for p in [root.pid, *descendants(root.pid)]) / 1024


class UserIds(NamedTuple):
    """The four user ids of a process (``Uid`` of ``/proc/<pid>/status``, in this order; ``credentials(7)``).

    Attributes:
        real: Who started it (``getuid()``).
        effective: Whose permissions it has now (``geteuid()``).
        saved: The saved set-user-id (what ``seteuid`` may switch back to).
        filesystem: Whose permissions file access is checked with (normally ``effective``).
    """

    real: int
    effective: int
    saved: int
    filesystem: int


def user_ids(pid: int | str = "self") -> UserIds | None:
    """A process's real, effective, saved and filesystem user ids (``Uid``); None if it is gone."""
    found = status_fields(pid).get("Uid", "").split()
    if len(found) != 4:
        return None
    return UserIds(*(int(uid) for uid in found))


def effective_capabilities(pid: int | str = "self") -> int:
    """A process's effective capability set as a bit mask (``CapEff``; bit 23 is ``CAP_SYS_NICE``); 0 if gone."""
    return int(status_fields(pid).get("CapEff", "0"), 16)
