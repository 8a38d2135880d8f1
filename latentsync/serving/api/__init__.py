"""HTTP API: the Flask app, its routes and the one map from errors to HTTP statuses.

Uploads, tasks, channels, avatars, streamed speech, WHEP, events and the control page. The top
layer: nothing below it knows about HTTP. Nothing is re-exported; import from the modules:
``latentsync.serving.api.app`` (create_app), ``latentsync.serving.api.errors`` (ApiError), ...
"""

__all__: list[str] = []
