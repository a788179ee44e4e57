"""One run per output: a lock file next to the output, created atomically.

The lock of ``out.zarr/pred`` is the file ``out.zarr/pred.lock``, a JSON object
``{"host": ..., "pid": ..., "started": ...}`` (``started`` in ISO 8601 UTC).
It is created complete, in one step (a hard link of a written temporary file),
so a reader never sees a half-written lock. A second run on the same output is
refused and told who holds it; a lock left by a process that died on this host
is taken over with a warning; a lock from another host is broken with
``blockpredict unlock WORKFLOW`` (or by deleting the file).

:class:`OutputLock` (acquire, release, holder, break_lock) works on local
paths and on object-store URLs: there the lock is an object created with a
conditional write (S3's ``If-None-Match: *``, see ``stores.create_exclusive``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from types import TracebackType

from . import stores
from .errors import BlockpredictError
from .urls import is_url

logger = logging.getLogger(__name__)

SUFFIX = ".lock"


class OutputLockedError(BlockpredictError, RuntimeError):
    """Another run holds the output's lock."""


def lock_path(output_path: str) -> str:
    """Where the lock of an output lives: beside it, ``<output>.lock``."""
    return output_path.rstrip("/") + SUFFIX


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: host, process id and start time."""

    host: str
    pid: int
    started: str

    @classmethod
    def me(cls) -> Holder:
        started = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), started)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    @property
    def alive(self) -> bool:
        """False only when it certainly is not: a dead pid on this host."""
        if not self.on_this_host:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a live process of another user
            return True
        return True


class OutputLock:
    """The lock of one output: a file beside a local path, an object beside a URL."""

    def __init__(self, output_path: str, storage_options: dict | None = None) -> None:
        self.path = lock_path(str(output_path))
        self.options = dict(storage_options or {})
        self.remote = is_url(self.path)
        self._created: list[str] = []  # folders made to hold the lock, removed on release
        self._held = False

    def holder(self) -> Holder | None:
        """The current holder, or None when the output is not locked."""
        try:
            if self.remote:
                raw = stores.read_object(self.path, self.options)
                if raw is None:
                    return None
                data = json.loads(raw)
            else:
                with open(self.path) as f:
                    data = json.load(f)
            return Holder(str(data["host"]), int(data["pid"]), str(data["started"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError):
            return Holder("unknown", -1, "unknown")  # unreadable: treat as held elsewhere

    def acquire(self) -> Holder:
        """Take the lock, or raise :class:`OutputLockedError` naming its holder."""
        me = Holder.me()
        self._make_parent()
        if self._create(me):
            self._held = True
            return me
        holder = self.holder()
        if holder is not None and not holder.alive:
            logger.warning("taking over a stale lock (%s, no longer running)", holder)
            self.break_lock()
            if self._create(me):
                self._held = True
                return me
            holder = self.holder()
        self.release()  # only removes the folders made above
        raise OutputLockedError(
            f"another run writes this output ({holder})",
            self.path,
            "wait for it to finish; if it is gone, run blockpredict unlock WORKFLOW "
            "or delete the lock file",
        )

    def release(self) -> None:
        """Give the lock back (if held) and remove folders made only for it."""
        if self._held:
            self._delete()
            self._held = False
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)  # only while empty: nothing else was written there
            except OSError:
                break
        self._created = []

    def break_lock(self) -> Holder | None:
        """Remove the lock whoever holds it; returns the holder it had."""
        holder = self.holder()
        if holder is None:
            return None
        self._delete()
        return holder

    def _delete(self) -> None:
        if self.remote:
            stores.delete_object(self.path, self.options)
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _make_parent(self) -> None:
        if self.remote:  # object stores have no folders to make
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        missing = []
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(missing):
            os.mkdir(folder)
            self._created.append(folder)

    def _create(self, me: Holder) -> bool:
        """Write the lock complete in a temporary file, then link it into place."""
        if self.remote:
            data = (json.dumps(asdict(me)) + "\n").encode()
            return stores.create_exclusive(self.path, data, self.options)
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(me), f)
                f.write("\n")
            try:
                os.link(tmp, self.path)  # atomic: fails when the lock exists
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
