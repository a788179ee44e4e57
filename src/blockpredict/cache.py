"""A bounded cache of recently read input chunks, one per worker process.

Neighbouring blocks overlap by their context, so their reads share input
chunks; blocks go out in Morton order, so a worker's next block is usually a
neighbour of its last. Keeping the last few hundred MiB of chunks (least
recently used out first) saves those fetches from an object store.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

DEFAULT_BYTES = 256 << 20


class ChunkCache(WrapperStore[Any]):
    """Read-only store wrapper: whole-object reads kept up to ``max_bytes`` (LRU)."""

    def __init__(self, store: Any, max_bytes: int = DEFAULT_BYTES) -> None:
        super().__init__(store)
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, Buffer] = OrderedDict()

    def _with_store(self, store: Any) -> ChunkCache:
        return type(self)(store, self.max_bytes)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if byte_range is not None:  # partial reads (shard indexes) pass through
            return await self._store.get(key, prototype, byte_range)
        cached = self._items.get(key)
        if cached is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            self._put(key, value)
        return value

    def _put(self, key: str, value: Buffer) -> None:
        size = len(value)
        if size > self.max_bytes:
            return
        self._items[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= len(old)
