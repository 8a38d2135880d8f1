"""Bottom layer of latentsync.serving: what every other part may use (no imports from them).

Nothing is re-exported; import from the modules: ``latentsync.serving.core.errors`` (ServingError,
public_reason), ``latentsync.serving.core.states`` (StateMachine).
"""

__all__: list[str] = []
