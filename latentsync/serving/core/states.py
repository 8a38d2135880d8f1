"""One style for every state machine of the server: an enum, a table of allowed moves, one writer.

Tasks, channels, avatar switches, uploaded avatars and the stream itself each have a ``str`` enum
of states and a ``dict`` from every state to the states it may move to. A :class:`StateMachine`
holds the current state and changes it only along that table, under a lock, so that when several
threads race to end something (an API cancel, a failure, the mixer finishing it) the first move
wins and the others are refused. Final states are those with no moves. Every change is kept in
:attr:`StateMachine.history` (bounded) and may call a hook outside the lock.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=enum.Enum)

#: States a machine keeps in its history (the first one and the latest ones).
MAX_HISTORY = 32


def check_table(states: type[S], moves: Mapping[S, frozenset[S]]) -> None:
    """Check that ``moves`` names every state of ``states`` and only those (raised at import time).

    Raises:
        ValueError: If a state has no row, or a row names something that is not a state.
    """
    missing = [s.value for s in states if s not in moves]
    unknown = [t for targets in moves.values() for t in targets if not isinstance(t, states)]
    if missing or unknown:
        raise ValueError(f"{states.__name__} moves: no row for {missing}, unknown targets {unknown}")


class StateMachine(Generic[S]):
    """A state that changes only along a table of allowed moves; the first of racing moves wins.

    Args:
        initial: The starting state.
        moves: Every state -> the states it may move to (final states: an empty set).
        name: What the machine belongs to, for log lines (``task 1f2e...``, ``channel hall``).
        on_change: Called with ``(previous, new, reason)`` after every move, outside the lock (must
            not block), or None.
    """

    def __init__(
        self,
        initial: S,
        moves: Mapping[S, frozenset[S]],
        name: str,
        on_change: Callable[[S, S, str | None], None] | None = None,
    ):
        self._state = initial
        self._moves = moves
        self._name = name
        self._lock = threading.Lock()
        self.on_change = on_change
        self.history: list[S] = [initial]
        self.reason: str | None = None
        self.changed_monotonic = time.monotonic()

    @property
    def state(self) -> S:
        """The current state."""
        return self._state

    @property
    def final(self) -> bool:
        """True in a state with no moves out."""
        return not self._moves[self._state]

    def can_move(self, to: S) -> bool:
        """Whether ``to`` is allowed from the current state (it may no longer be by the time you move)."""
        return to in self._moves[self._state]

    def move(self, to: S, reason: str | None = None, quiet: bool = False) -> S | None:
        """Move to ``to`` if the table allows it from the current state.

        Args:
            to: The new state.
            reason: Kept as :attr:`reason` when the move is made (why it failed, was cancelled...).
            quiet: Do not log a refused move (callers that try a move which may legitimately be late).

        Returns:
            The state moved from, or None when the move was refused.
        """
        with self._lock:
            previous = self._state
            if to not in self._moves[previous]:
                if not quiet and self._moves[previous]:
                    logger.error("%s: illegal move %s -> %s refused", self._name, previous.value, to.value)
                return None
            self._state = to
            self.history.append(to)
            if len(self.history) > MAX_HISTORY:
                del self.history[1 : len(self.history) - MAX_HISTORY + 1]
            if reason is not None:
                self.reason = reason
            self.changed_monotonic = time.monotonic()
            hook = self.on_change
        if hook is not None:
            hook(previous, to, reason)
        return previous
