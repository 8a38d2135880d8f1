"""Playout: the output clock, the mixer (speech programs, crossfades), the idle loop, the tick tap, paste-back.

Import from the modules: ``clock`` (:class:`StreamingController`, the ``TickSource``/``TickSink``
seams), ``mixer`` (:class:`ProgramMixer`, the ``Program`` protocol), ``idle``, ``state``, ``tap``,
``paste`` (:class:`FramePaster`).
"""

__all__: list[str] = []
