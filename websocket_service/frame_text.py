"""A frame's WebSocket text: where encoded media becomes base64 JSON, and only here.

The feed hands its readers each access unit as bytes (:class:`.feed.Item`); a WebSocket
reader's first send of an item asks for its text, made by one of these (once; every other
WebSocket reader of the item sends the same string):

* a live-encoded frame: :func:`.wire.frame_message` with the packet's base64
  (:func:`live_text`);
* a copied idle-loop frame: ``frame_message``'s text for its clip, state and keyframe flag,
  made once per feed with stand-ins, with this frame's index, timestamp and packet put in
  their places (:func:`loop_text`); each loop packet's base64 is made once for every session
  (:func:`loop_b64`).
"""

from __future__ import annotations

import dataclasses
import weakref

from .avatars.model import VideoNames
from .media.loops import EncodedLoop
from .playout import OutputFrame
from .wire import b64, frame_message

#: stand-ins that a loop frame's message template is made with (each appears once in it)
_DATA_SLOT, _TS_SLOT, _INDEX_SLOT = "@@frame-data@@", -918273645, -546372819
_SLOTS = {"data": _DATA_SLOT, "timestamp": str(_TS_SLOT), "index": str(_INDEX_SLOT)}

#: a loop frame's message as a ``str.format`` pattern, per (clip, state, keyframe): see _pattern
Templates = dict[tuple[str, str, bool], str]
#: the base64 of each loop packet that a WebSocket reader has sent, per loop (made once)
_LOOP_B64: weakref.WeakKeyDictionary[EncodedLoop, list[str | None]] = weakref.WeakKeyDictionary()


def live_text(session_id: str, names: VideoNames, f: OutputFrame, data: bytes,
              keyframe: bool) -> str:
    """``f``'s message, its packet ``data`` in base64."""
    return frame_message(session_id, f, b64(data), keyframe, names)


def loop_b64(loop: EncodedLoop, p: int) -> str:
    """The base64 of ``loop``'s packet ``p``: made once per loop packet, for every session."""
    made = _LOOP_B64.get(loop)
    if made is None:
        made = _LOOP_B64.setdefault(loop, [None] * loop.period)
    text = made[p]
    if text is None:
        text = made[p] = b64(loop.packets[p])
    return text


def loop_text(templates: Templates, session_id: str, names: VideoNames, f: OutputFrame,
              loop: EncodedLoop, p: int, keyframe: bool) -> str:
    """``frame_message``'s text for a copied loop frame, without building and serialising
    message models per frame: the text for this clip, state and keyframe flag is made once
    per feed (in ``templates``) with stand-ins, and this frame's packet (``loop``'s packet
    ``p``), timestamp and index put in their places (a plain loop frame's message depends on
    nothing else)."""
    key = (f.clip, f.state.value, keyframe)
    pattern = templates.get(key)
    if pattern is None:
        probe = dataclasses.replace(f, index=_INDEX_SLOT, timestamp_ms=_TS_SLOT)
        pattern = templates[key] = _pattern(
            frame_message(session_id, probe, _DATA_SLOT, keyframe, names))
    return pattern.format(data=loop_b64(loop, p), timestamp=int(f.timestamp_ms),
                          index=int(f.index))


def _pattern(text: str) -> str:
    """``text`` as a ``str.format`` pattern: its braces doubled, each stand-in a named field."""
    texts, slots = _template(text)
    lit = [t.replace("{", "{{").replace("}", "}}") for t in texts]
    return lit[0] + "".join(f"{{{name}}}{t}" for name, t in zip(slots, lit[1:], strict=True))


def _template(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``text`` cut at each stand-in of :data:`_SLOTS`: (the texts around them, their names)."""
    at = sorted((text.index(v), name, len(v)) for name, v in _SLOTS.items())
    assert all(text.count(v) == 1 for v in _SLOTS.values()), text
    texts, start = [], 0
    for pos, _, n in at:
        texts.append(text[start:pos])
        start = pos + n
    texts.append(text[start:])
    return tuple(texts), tuple(name for _, name, _ in at)
