"""Runtime: builds every part from one config and owns it.

The channels (wiring only), channel persistence (``channels_file``), avatar switches. Nothing is
re-exported; import from the modules: ``latentsync.serving.runtime.runtime`` (Runtime),
``latentsync.serving.runtime.channel`` (Channel), ...
"""

__all__: list[str] = []
