"""Playout: the output clock, the mixer (idle loop, speech programs, crossfades), the idle loop and the tick tap."""
