"""The server: one folder per concern, imports only go down (pyproject.toml, ``[tool.importlinter]``).

Layers, top to bottom (``a | b``: siblings that do not import each other)::

    api                    HTTP: Flask app, routes, the error -> status map
    runtime                Runtime, Channel (wiring), channels_file, avatar switch
    telemetry              health snapshot, Prometheus metrics, SSE events
    ingest | avatars       where speech comes from: upload decoder, TTS, PCM | uploaded avatars
    tasks                  TaskManager, processors, utterances, programs (reorder and jitter buffers)
    compute                the EDF scheduling pool, its local and Ray backends, the engine host
    playout | egress       clock, mixer, idle loop, tick tap | encoders and outputs (FFmpeg), WHEP, frames
    ops                    systemd, logs, heap, native threads, /proc, TCP send state, face searches
    core                   state machines, errors shared by all

Nothing is re-exported here: import from the folders (each ``__init__`` says what it exports) or their modules.
"""

__all__: list[str] = []
