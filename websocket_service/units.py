"""Definitions the whole service shares: the audio format and the identifier syntax."""

from __future__ import annotations

import re

SAMPLE_RATE = 16_000  # Hz, mono, PCM s16le: the only audio format on the wire
#: the video rate. Fixed: the protocol's 40 ms audio chunk is one frame's audio, and MuseTalk's
#: audio features (50 per second) come two to a frame. ``FPS`` other than this is refused.
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640: the audio of one video frame
BYTES_PER_SAMPLE = 2

#: user, avatar and session identifiers (a UUID string fits)
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(ID_PATTERN)
