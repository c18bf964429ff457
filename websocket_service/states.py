"""The avatar's visual state and the table of allowed moves.

A move to the current state is a no-op; a move not in the table raises
InvalidStateTransition; every real move returns a typed :class:`StateChange` for the caller to
report (no callback, so the machine holds no reference back to its owner).
"""

from __future__ import annotations

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
    def __init__(self, initial: AvatarState = AvatarState.IDLE) -> None:
        self.state = initial

    def can(self, target: AvatarState, table: dict[AvatarState, frozenset[AvatarState]] = ALLOWED) -> bool:
        return target is self.state or target in table[self.state]

    def check(self, target: AvatarState,
              table: dict[AvatarState, frozenset[AvatarState]] = ALLOWED) -> None:
        if not self.can(target, table):
            raise InvalidStateTransition(
                f"cannot move from {self.state.value} to {target.value}",
                {"from": self.state.value, "to": target.value,
                 "allowed": sorted(s.value for s in table[self.state])})

    def move(self, target: AvatarState) -> StateChange | None:
        """Move (validated against ALLOWED); the change, or None if already there."""
        if target is self.state:
            return None
        self.check(target)
        prev, self.state = self.state, target
        return StateChange(prev, target)
