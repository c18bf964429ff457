"""Definitions the whole service shares: the audio format and the identifier syntax."""

from __future__ import annotations

import re

SAMPLE_RATE = 16_000  # Hz, mono, PCM s16le: the only audio format on the wire
SAMPLES_PER_FRAME = 640  # 40 ms at 16 kHz: the audio of one video frame at 25 fps
BYTES_PER_SAMPLE = 2

#: user, avatar and session identifiers (a UUID string fits)
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(ID_PATTERN)
