"""Avatars uploaded while the server runs: confined intake, background preparation, the cache's disk quota."""
