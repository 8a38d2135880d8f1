"""Operations: systemd integration (readiness, watchdog) and logging."""
