"""The avatar's visual state and the table of allowed moves.

A move to the current state is a no-op; a move not in the table raises
InvalidStateTransition; every real move is reported to the listener as a typed event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .errors import InvalidStateTransition


class AvatarState(str, Enum):
    IDLE = "idle"
    SPEAKING = "speaking"
    ACTION = "action"


ALLOWED: dict[AvatarState, frozenset[AvatarState]] = {
    AvatarState.IDLE: frozenset({AvatarState.SPEAKING, AvatarState.ACTION}),
    AvatarState.SPEAKING: frozenset({AvatarState.IDLE, AvatarState.ACTION}),
    AvatarState.ACTION: frozenset({AvatarState.IDLE, AvatarState.SPEAKING}),
}

#: moves a client may ask for with STATE_CHANGE (actions start with ACTION and end by themselves)
CLIENT_ALLOWED: dict[AvatarState, frozenset[AvatarState]] = {
    AvatarState.IDLE: frozenset({AvatarState.SPEAKING}),
    AvatarState.SPEAKING: frozenset({AvatarState.IDLE}),
    AvatarState.ACTION: frozenset(),
}


@dataclass(frozen=True)
class StateChange:
    previous: AvatarState
    current: AvatarState


class StateMachine:
    def __init__(self, on_change: Callable[[StateChange], None],
                 initial: AvatarState = AvatarState.IDLE) -> None:
        self.state = initial
        self._on_change = on_change

    def can(self, target: AvatarState, table: dict[AvatarState, frozenset[AvatarState]] = ALLOWED) -> bool:
        return target is self.state or target in table[self.state]

    def check(self, target: AvatarState,
              table: dict[AvatarState, frozenset[AvatarState]] = ALLOWED) -> None:
        if not self.can(target, table):
            raise InvalidStateTransition(
                f"cannot move from {self.state.value} to {target.value}",
                {"from": self.state.value, "to": target.value,
                 "allowed": sorted(s.value for s in table[self.state])})

    def move(self, target: AvatarState) -> bool:
        """Move (validated against ALLOWED); returns whether the state changed."""
        if target is self.state:
            return False
        self.check(target)
        prev, self.state = self.state, target
        self._on_change(StateChange(prev, target))
        return True
