"""Operations: systemd (readiness, watchdog), logging, the heap, native threads, /proc, TCP send state, face searches.

Nothing is re-exported; import from the modules: ``latentsync.serving.ops.systemd``,
``latentsync.serving.ops.logs``, ``latentsync.serving.ops.memory``, ``latentsync.serving.ops.threads``,
``latentsync.serving.ops.procfs``, ``latentsync.serving.ops.sockets``, ``latentsync.serving.ops.exit``,
``latentsync.serving.ops.face_search`` (each in a child process).
"""

__all__: list[str] = []
