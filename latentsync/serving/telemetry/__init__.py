"""Telemetry: the typed health snapshot behind ``/health`` and ``/metrics``, and the live event feed.

Prometheus export, Server-Sent Events behind ``GET /events``. Nothing is re-exported; import from
the modules: ``latentsync.serving.telemetry.health`` (HealthSnapshot), ``latentsync.serving.telemetry.metrics``
(ServerMetrics), ``latentsync.serving.telemetry.events`` (EventBroadcaster, EventFeed).
"""

__all__: list[str] = []
