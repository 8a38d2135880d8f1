"""ops.sockets: the kernel's view of a process's TCP connections, on real loopback sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from latentsync.serving.ops.sockets import TcpSendState, socket_inodes, tcp_connections, tcp_send_state

SENDER = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setblocking(False)
print("connected", flush=True)
end = time.monotonic() + 20
while time.monotonic() < end:
    try:
        s.send(b"x" * 16384)
    except BlockingIOError:
        time.sleep(0.01)
"""


def sender(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "connected"
    return proc


def test_a_peer_that_stops_reading_closes_its_window_and_one_that_reads_does_not():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    port = listener.getsockname()[1]
    reader_proc = sender(port)
    reader, _ = listener.accept()
    frozen_proc = sender(port)
    frozen, _ = listener.accept()  # never read from: a frozen ingest
    try:
        deadline = time.monotonic() + 10
        states = {}
        while time.monotonic() < deadline:
            reader.settimeout(0.05)
            stop_reading = time.monotonic() + 0.2  # read for a while: the sender never stops sending
            try:
                while time.monotonic() < stop_reading and reader.recv(1 << 20):
                    pass
            except TimeoutError:
                pass
            states = {
                "reader": tcp_send_state(tcp_connections(reader_proc.pid)),
                "frozen": tcp_send_state(tcp_connections(frozen_proc.pid)),
            }
            if states["frozen"] is TcpSendState.window_closed:
                break
        assert states == {"reader": TcpSendState.flowing, "frozen": TcpSendState.window_closed}, states
        (connection,) = tcp_connections(frozen_proc.pid)
        assert connection.window_closed and connection.unsent_bytes > 0 and connection.bytes_acked > 0
        assert connection.inode in socket_inodes(frozen_proc.pid)
    finally:
        for proc in (reader_proc, frozen_proc):
            proc.kill()
            proc.wait(5)
        reader.close()
        frozen.close()
        listener.close()


def test_a_process_without_connections_has_none():
    assert tcp_connections(os.getpid()) == [] or all(c.inode for c in tcp_connections(os.getpid()))
    assert tcp_send_state([]) is None
    assert tcp_connections(2**22 + 12345) == []  # no such process
