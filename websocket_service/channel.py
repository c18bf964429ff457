"""The one bounded queue of the event loop: a single consumer, a stated drop policy.

Every stream that a slow consumer could let pile up (frames waiting to be encoded, a WebRTC
track's packets, microphone audio for a reader) goes through a :class:`DropOldest`:

* at most ``limit`` *droppable* items wait; putting one more drops the oldest droppable item,
  and :attr:`DropOldest.dropped` counts them (``put`` returns how many it dropped);
* items that are not droppable (``droppable(item)`` is false: control events, for instance)
  are never dropped and do not count towards ``limit``: their producer bounds them;
* after :meth:`close`, ``get`` returns what is left, then raises :class:`ChannelClosed`.

It is not thread-safe: every call is made on the event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ChannelClosed(Exception):
    """``get`` on a closed channel with nothing left in it."""


class DropOldest(Generic[T]):
    """A bounded single-consumer queue that drops its oldest droppable item when full."""

    def __init__(self, limit: int, droppable: Callable[[T], bool] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.limit = limit
        self._droppable = droppable
        self._items: deque[T] = deque()
        self._counted = 0  # droppable items waiting
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def _counts(self, item: T) -> bool:
        return self._droppable is None or self._droppable(item)

    def put(self, item: T) -> int:
        """Append without blocking; how many items were dropped to make room."""
        dropped = 0
        if self._counts(item):
            while self._counted >= self.limit:
                self._drop_oldest()
                dropped += 1
            self._counted += 1
        self._items.append(item)
        self._ready.set()
        self.dropped += dropped
        return dropped

    def _drop_oldest(self) -> None:
        if self._droppable is None:
            self._items.popleft()
        else:
            for i, old in enumerate(self._items):
                if self._droppable(old):
                    del self._items[i]
                    break
        self._counted -= 1

    def get_nowait(self) -> T:
        """The oldest item; IndexError when empty."""
        item = self._items.popleft()
        if self._counts(item):
            self._counted -= 1
        return item

    def peek(self) -> T:
        """The oldest item, left where it is; IndexError when empty."""
        return self._items[0]

    async def get(self) -> T:
        """The oldest item, waiting for one; ChannelClosed once closed and empty."""
        while not self._items:
            if self._closed:
                raise ChannelClosed
            self._ready.clear()
            await self._ready.wait()
        return self.get_nowait()

    def close(self) -> None:
        """No more items will come: ``get`` drains what is left, then raises ChannelClosed."""
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        """Droppable items waiting (the figure ``limit`` bounds)."""
        return self._counted

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)
