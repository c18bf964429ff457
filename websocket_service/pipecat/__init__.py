"""Pipecat integration (the ``pipecat`` extra): the avatar as a pipecat service, and a bot.

Only this package imports pipecat, so the service itself runs without the extra.

* :class:`MuseTalkProcessor` - TTS audio in, lip-synced images and their audio out.
* :mod:`.bot` - a runnable bot (``python -m websocket_service.pipecat.bot``).
* :class:`RemoteMuseTalkProcessor` - the same, rendered by a remote avatar server.
"""

from .processor import MuseTalkProcessor
from .remote import RemoteMuseTalkProcessor

__all__ = ["MuseTalkProcessor", "RemoteMuseTalkProcessor"]
