"""What the kernel says about another process's TCP connections (``/proc``): is its peer still taking bytes?

A relay FFmpeg pushing RTMP cannot tell us that its destination stopped reading until its own
buffers are full, and its progress report keeps counting while they fill. The kernel knows
earlier: a receiver that stopped reading advertises a zero window (the sender's zero-window probe
timer runs), and a receiver that is gone does not acknowledge (the retransmission timer runs with
retransmissions counted). :func:`tcp_send_state` reads both from ``/proc/<pid>/net/tcp`` and
``tcp6`` for the sockets the process holds (``/proc/<pid>/fd``).

Field layout: ``Documentation/networking/proc_net_tcp.rst`` in the Linux sources (``st`` 01 is
ESTABLISHED; ``tr`` 1 is the retransmission timer, 4 the zero-window probe timer; ``retrnsmt``
counts unrecovered retransmissions or window probes).
"""

from __future__ import annotations

import enum
import os
import re

ESTABLISHED = "01"
TIMER_RETRANSMIT = "01"
TIMER_ZERO_WINDOW_PROBE = "04"
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


class TcpSendState(str, enum.Enum):
    """How the established TCP connections of a process are sending."""

    flowing = "flowing"  # nothing stuck: every peer acknowledges and has room
    window_closed = "window_closed"  # a peer advertises a zero window: it has stopped reading
    retransmitting = "retransmitting"  # a peer does not acknowledge: it is unreachable or gone


def socket_inodes(pid: int) -> set[str]:
    """Inode numbers (as text) of the sockets process ``pid`` holds open; empty if it is gone."""
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            match = _SOCKET_LINK.fullmatch(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
        if match:
            found.add(match.group(1))
    return found


def tcp_send_state(pid: int) -> TcpSendState | None:
    """The worst send state among the established TCP connections of process ``pid``.

    Returns:
        :attr:`TcpSendState.window_closed` when a peer's window is closed, else
        :attr:`TcpSendState.retransmitting` when a peer leaves bytes unacknowledged with
        retransmissions counted, else :attr:`TcpSendState.flowing`; None when the process holds
        no established TCP connection (or is gone).
    """
    inodes = socket_inodes(pid)
    if not inodes:
        return None
    state: TcpSendState | None = None
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes or fields[3] != ESTABLISHED:
                continue
            timer = fields[5].split(":", 1)[0]
            if timer == TIMER_ZERO_WINDOW_PROBE:
                return TcpSendState.window_closed
            if timer == TIMER_RETRANSMIT and int(fields[6], 16) > 0:
                state = TcpSendState.retransmitting
            elif state is None:
                state = TcpSendState.flowing
    return state
