"""Runtime: builds every part from one config and owns it.

The channels (wiring only), channel persistence (``channels_file``), avatar switches.
"""
