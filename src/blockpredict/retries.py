"""Transient errors of object stores, retried with capped, jittered backoff.

Throttling, 5xx answers, timeouts and reset connections are retried inside the
read or write (s3fs, gcsfs and fsspec's HTTP filesystem raise them as several
types, told apart here); a 404 or a denial never is. :class:`RetryingStore` puts
these retries around every call zarr makes to an ``FsspecStore``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

logger = logging.getLogger(__name__)

# transient errors: this many attempts, sleeping up to min(CAP, BASE * 2**n), full jitter
ATTEMPTS = 8
BASE_S = 0.05
CAP_S = 5.0
THROTTLE_CODES = ("SlowDown", "Throttl", "RequestLimitExceeded", "TooManyRequests", "Unavailable")
# s3fs maps throttling and 503 to EBUSY, unknown S3 errors to EIO
TRANSIENT_ERRNOS = (errno.EBUSY, errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET)
T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """Throttling, 5xx answers, timeouts and reset connections; never a 404 or a denial."""
    if isinstance(
        error,
        FileNotFoundError | PermissionError | FileExistsError | IsADirectoryError,
    ):
        return False
    if isinstance(error, ConnectionError | TimeoutError | asyncio.TimeoutError):
        return True
    status = _status(error)
    if status is not None:
        return status >= 500 or status == 429
    name = type(error).__name__
    if name in (
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "ClientPayloadError",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "IncompleteRead",
        "ResponseParserError",
        "ProxyError",  # gcsfs: a 502 answer
        "ChunkedEncodingError",
    ):
        return True
    if isinstance(error, OSError):
        text = str(error)
        if text.startswith("Forbidden"):  # gcsfs: a 403 answer
            return False
        return error.errno in TRANSIENT_ERRNOS or any(c in text for c in THROTTLE_CODES)
    return False


def _status(error: BaseException) -> int | None:
    for name in ("status", "code"):  # aiohttp ClientResponseError; gcsfs HttpError
        status = getattr(error, name, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
    response = getattr(error, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(code) if code else None
    return None


def backoff_delay(attempt: int) -> float:
    """Full jitter: uniform in [0, min(CAP_S, BASE_S * 2**attempt)]."""
    return random.uniform(0.0, min(CAP_S, BASE_S * 2**attempt))


async def retry_async(call: Callable[[], Awaitable[T]], what: str) -> T:
    """Await ``call()``, retrying transient errors with capped, jittered backoff."""
    for attempt in range(ATTEMPTS):
        try:
            return await call()
        except Exception as e:
            if not is_transient(e) or attempt == ATTEMPTS - 1:
                raise
            delay = backoff_delay(attempt)
            logger.debug("transient error on %s (%s), retry in %.2fs", what, short(e), delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def retry(call: Callable[[], T], what: str) -> T:
    """``call()`` with the same retries, for synchronous filesystem calls."""
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except Exception as e:
            if not is_transient(e) or attempt == ATTEMPTS - 1:
                raise
            delay = backoff_delay(attempt)
            logger.debug("transient error on %s (%s), retry in %.2fs", what, short(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


class RetryingStore(WrapperStore[FsspecStore]):
    """Retries every read, write, listing and delete on transient errors.

    A missing key is no error here (``get`` returns None, zarr fills the chunk),
    so it is never retried. A write that is retried rewrites the whole object:
    S3 objects appear whole or not at all, so no partial chunk is left behind.
    """

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await retry_async(lambda: self._store.get(key, prototype, byte_range), key)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        return await retry_async(
            lambda: self._store.get_partial_values(prototype, key_ranges), "partial values"
        )

    async def exists(self, key: str) -> bool:
        return await retry_async(lambda: self._store.exists(key), key)

    async def set(self, key: str, value: Buffer) -> None:
        await retry_async(lambda: self._store.set(key, value), key)

    async def delete(self, key: str) -> None:
        await retry_async(lambda: self._store.delete(key), key)


def is_denied(error: BaseException) -> bool:
    """Denied credentials: s3fs's PermissionError, gcsfs's ``Forbidden`` or 401."""
    if isinstance(error, PermissionError):
        return True
    if isinstance(error, OSError) and str(error).startswith("Forbidden"):
        return True
    return _status(error) in (401, 403)
