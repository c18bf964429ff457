"""Pipecat integration (the ``pipecat`` extra): the avatar as a pipecat service, and a bot.

Only this package imports pipecat, so the service itself runs without the extra.

* :class:`MuseTalkProcessor` - TTS audio in, lip-synced images and their audio out.
* :mod:`.bot` - a runnable bot (``python -m websocket_service.pipecat.bot``).
* :class:`RemoteMuseTalkProcessor` - the same, rendered by a remote avatar server.
"""

import importlib.util

if importlib.util.find_spec("pipecat") is None:
    raise ImportError("websocket_service.pipecat needs the pipecat extra (Python 3.11+): "
                      "pip install -e '.[pipecat]'")

from .processor import MuseTalkProcessor  # noqa: E402 - after the friendly check
from .remote import RemoteMuseTalkProcessor

__all__ = ["MuseTalkProcessor", "RemoteMuseTalkProcessor"]
