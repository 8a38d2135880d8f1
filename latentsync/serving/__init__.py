"""The server: one folder per concern, imports only go down (pyproject.toml, ``[tool.importlinter]``).

Layers, top to bottom (``a | b``: siblings that do not import each other)::

    api                    HTTP: Flask app, routes, the error -> status map
    runtime                Runtime, Channel (wiring), channels_file, avatar switch
    telemetry              health snapshot, Prometheus metrics, SSE events
    generation | avatars   tasks, scheduler, programs, processors, utterances, TTS, worker pool | uploaded avatars
    playout | egress       clock, mixer, idle loop, tick tap | encoders and outputs (FFmpeg), WHEP, frames
    ops                    systemd, logs
    core                   state machines, errors shared by all
"""
