"""Real GCS and HTTP servers on loopback for the tests.

``gcs_server``: gcp-storage-emulator (the GCS JSON API, in memory) in a thread of
this process. Its uploads ignore the ``ifGenerationMatch`` precondition that GCS
honours, so :func:`_honour_if_generation_match` adds the one case the lock
uses, ``ifGenerationMatch=0`` (create only if absent, else 412), as GCS
documents it. The emulator answers one request at a time, so its check and
create cannot interleave.

``http_server``: python's ``http.server`` serving a folder, read-only, as a
static web server serves a zarr container.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from s3server import free_port


@contextmanager
def gcs_server() -> Iterator[str]:
    """The emulator on 127.0.0.1; yields its endpoint (what ``STORAGE_EMULATOR_HOST`` takes)."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # a line per 404
    _honour_if_generation_match()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _honour_if_generation_match() -> None:
    """Make the emulator's object insert answer 412 to ``ifGenerationMatch=0`` on an object."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    insert = getattr(objects.insert, "__wrapped__", objects.insert)

    @functools.wraps(insert)
    def conditional_insert(request: Any, response: Any, storage: Any, *args: Any) -> Any:
        if request.query.get("ifGenerationMatch") == ["0"]:
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):
                name = request.data.get("meta", {}).get("name")
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
            except NotFound:
                pass
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return insert(request, response, storage, *args)

    objects.insert = conditional_insert  # the router's fallback looks it up here
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is insert:
                handlers[method] = conditional_insert


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """``folder`` served over HTTP on 127.0.0.1; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
