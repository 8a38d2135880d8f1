"""Bottom layer of latentsync.serving: what every other part may use (no imports from them)."""
