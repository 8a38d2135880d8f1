"""Telemetry: the typed health snapshot behind ``/health`` and ``/metrics``, and the live event feed.

Prometheus export, Server-Sent Events behind ``GET /events``.
"""
