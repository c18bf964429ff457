"""What a session reports to its transports, in domain terms (no wire format here).

Sinks receive these (and :class:`~.errors.ServiceError` instances) through ``on_event``;
:mod:`.wire` is the one place that turns them into protocol messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from .states import AvatarState


@dataclass(frozen=True)
class StateChanged:
    previous: AvatarState
    current: AvatarState
    clip: str  # the base clip now playing (the action's clip while an action plays)


@dataclass(frozen=True)
class SpeechEnded:
    utterance_id: int
    frames: int
    skipped: int = 0
    interrupted: bool = False


@dataclass(frozen=True)
class ActionTriggered:
    clip: str
    frames: int


@dataclass(frozen=True)
class ClosedByClient:
    reason: str = "client_request"


SessionEvent = StateChanged | SpeechEnded | ActionTriggered | ClosedByClient
