"""What the kernel says about another process's TCP connections: is the peer still taking bytes?

A relay FFmpeg pushing RTMP cannot tell us that its destination stopped reading until its own
buffers are full, and its progress report keeps counting a while after that. The kernel knows as
soon as the peer's receive buffer is full: the peer then advertises a zero window (the sender's
zero-window probe timer runs). A peer that is gone does not acknowledge at all (the retransmission
timer runs, retransmissions counted). Before its buffer is full, a frozen peer's kernel takes and
acknowledges every byte like a reading one (tried here: a Linux receiver with room keeps
advancing its window whether its application reads or not), so nothing on the sending side can
tell them apart.

:func:`tcp_connections` asks the kernel with one ``SOCK_DIAG_BY_FAMILY`` netlink dump (the
interface ``ss`` uses) for the established TCP connections of the sockets a process holds
(``/proc/<pid>/fd``), with each one's timer and ``struct tcp_info``. Layouts:
``include/uapi/linux/inet_diag.h``, ``sock_diag.h`` and ``tcp.h`` in the Linux sources
(``tcpi_snd_wnd``, the peer's advertised window, exists since Linux 6.2).
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
INET_DIAG_INFO = 2
TCP_ESTABLISHED = 1
TIMER_RETRANSMIT = 1
TIMER_ZERO_WINDOW_PROBE = 4
_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI48s")  # inet_diag_req_v2: family, protocol, ext, pad, states, sockid
_MSG = struct.Struct(
    "=BBBB48sIIIII"
)  # inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue, wqueue, uid, inode
_RTATTR = struct.Struct("=HH")
TCPI_RETRANSMITS = 2  # u8
TCPI_BYTES_ACKED = 120  # u64: bytes the peer acknowledged
TCPI_NOTSENT_BYTES = 144  # u32: bytes written by the application, not yet sent
TCPI_SND_WND = 228  # u32: the peer's advertised receive window (Linux 6.2+)
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")
RECV_BYTES = 1 << 16


@dataclass(frozen=True, kw_only=True)
class TcpConnection:
    """One established TCP connection as the kernel sees it.

    Attributes:
        inode: The socket's inode number.
        timer: The pending timer: 0 none, 1 retransmission, 2 keepalive, 4 zero-window probe.
        retransmits: Unrecovered retransmissions (or window probes) in a row.
        unsent_bytes: Bytes the application wrote that are not sent yet.
        bytes_acked: Bytes the peer acknowledged since the connection opened.
        peer_window: The receive window the peer advertises, in bytes; None on kernels before 6.2.
    """

    inode: int
    timer: int
    retransmits: int
    unsent_bytes: int
    bytes_acked: int
    peer_window: int | None

    @property
    def window_closed(self) -> bool:
        """The peer's window is shut: it has stopped reading."""
        return self.timer == TIMER_ZERO_WINDOW_PROBE or (self.peer_window == 0 and self.unsent_bytes > 0)

    @property
    def unacknowledged(self) -> bool:
        """The peer leaves bytes unacknowledged and they are being sent again: it is unreachable or gone."""
        return self.timer == TIMER_RETRANSMIT and self.retransmits > 0


class TcpSendState(str, enum.Enum):
    """How a process's TCP connection is sending (the worst of its connections)."""

    flowing = "flowing"
    window_closed = "window_closed"
    retransmitting = "retransmitting"


def socket_inodes(pid: int) -> set[int]:
    """Inode numbers of the sockets process ``pid`` holds open; empty if it is gone."""
    found: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        with contextlib.suppress(OSError):
            match = _SOCKET_LINK.fullmatch(os.readlink(f"/proc/{pid}/fd/{name}"))
            if match:
                found.add(int(match.group(1)))
    return found


def tcp_connections(pid: int) -> list[TcpConnection]:
    """The established TCP connections (IPv4 and IPv6) of process ``pid``; empty if none or unknowable.

    Never raises: a kernel without sock_diag, or a process that is gone, gives an empty list.
    """
    inodes = socket_inodes(pid)
    if not inodes:
        return []
    out: list[TcpConnection] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            out += [c for c in _dump(family) if c.inode in inodes]
    return out


def tcp_send_state(connections: list[TcpConnection]) -> TcpSendState | None:
    """The worst state among ``connections``: window closed, then retransmitting, then flowing; None if none."""
    if not connections:
        return None
    if any(c.window_closed for c in connections):
        return TcpSendState.window_closed
    if any(c.unacknowledged for c in connections):
        return TcpSendState.retransmitting
    return TcpSendState.flowing


def _dump(family: int) -> list[TcpConnection]:
    """Every established TCP connection of ``family`` on the host, with its tcp_info (one netlink dump)."""
    request = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, 1 << TCP_ESTABLISHED, bytes(48))
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    found: list[TcpConnection] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        sock.send(header + request)
        while True:
            data = sock.recv(RECV_BYTES)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, pos)
                if kind == NLMSG_DONE or length < _NLMSGHDR.size:
                    return found
                if kind == NLMSG_ERROR:
                    raise OSError("sock_diag refused the request")
                body = data[pos + _NLMSGHDR.size : pos + length]
                connection = _parse(body)
                if connection is not None:
                    found.append(connection)
                pos += (length + 3) & ~3


def _parse(body: bytes) -> TcpConnection | None:
    if len(body) < _MSG.size:
        return None
    _, _, timer, _, _, _, _, _, _, inode = _MSG.unpack_from(body)
    info = b""
    pos = _MSG.size
    while pos + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, pos)
        if length < _RTATTR.size:
            break
        if kind == INET_DIAG_INFO:
            info = body[pos + _RTATTR.size : pos + length]
        pos += (length + 3) & ~3
    if len(info) < TCPI_NOTSENT_BYTES + 4:  # tcp_info of Linux 4.6+ has everything but the window
        return None
    window = struct.unpack_from("=I", info, TCPI_SND_WND)[0] if len(info) >= TCPI_SND_WND + 4 else None
    return TcpConnection(
        inode=inode,
        timer=timer,
        retransmits=info[TCPI_RETRANSMITS],
        unsent_bytes=struct.unpack_from("=I", info, TCPI_NOTSENT_BYTES)[0],
        bytes_acked=struct.unpack_from("=Q", info, TCPI_BYTES_ACKED)[0],
        peer_window=window,
    )
