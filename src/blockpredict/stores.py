"""Where containers live: local paths and fsspec URLs (s3://, gs://, http(s)://).

A local path stays a plain path string, so zarr keeps its local store and
nothing changes for data on disk. A URL becomes zarr's ``FsspecStore`` wrapped
in a :class:`~blockpredict.retries.RetryingStore` (transient errors retried with capped, jittered
backoff inside the read or write) and, for inputs read by workers, an
:class:`~blockpredict.cache.ChunkCache` of recently read chunks.

Credentials and endpoints come the standard way (AWS variables and config
files, ``AWS_ENDPOINT_URL``, Google's application-default credentials);
``storage_options`` are passed to fsspec as they are. Filesystems are made in
the process that uses them (workers open their own stores; only block ids
travel), and fsspec drops its cached instances after a fork.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zarr
from zarr.storage import FsspecStore

from .errors import InputError
from .retries import RetryingStore, is_denied, retry, short
from .urls import READ_ONLY_SCHEMES, is_url, local_path

logger = logging.getLogger(__name__)

# a conditional create: S3's If-None-Match: *, GCS's ifGenerationMatch=0 (fsspec mode="create")
CONDITIONAL_SCHEMES = ("s3", "gs", "gcs")
Options = Mapping[str, Any] | None


# --- opening ----------------------------------------------------------------


def zarr_store(
    path: str | Path, options: Options = None, read_only: bool = False, cache_bytes: int = 0
) -> Any:
    """What to give zarr for ``path``: the path itself, or a retrying fsspec store.

    ``cache_bytes`` > 0 adds a bounded cache of recently read chunks (inputs only).
    """
    if not is_url(path):
        return str(path)
    url = str(path)
    if url.startswith("file://"):
        return str(local_path(url))
    fs, inner_path = _url_to_fs(url, options, asynchronous=True)
    if not fs.async_impl:
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(fs)
    store: Any = RetryingStore(FsspecStore(fs, path=inner_path, read_only=read_only))
    if cache_bytes > 0 and read_only:
        from .cache import ChunkCache

        store = ChunkCache(store, cache_bytes)
    return store


# zarrs (Rust) encodes, decodes and writes a call's chunks in parallel, outside the
# interpreter: about 0.2 ms per chunk where zarr-python's pipeline takes 1.5 (README)
FAST_PIPELINE = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
# zarr's config and Python's warning filters are process-wide: one opening at a time
_OPENING = threading.Lock()


def open_array(
    path: str | Path, options: Options = None, mode: str = "r", cache_bytes: int = 0
) -> Any:
    """A zarr array of a worker's block I/O: on a local disk through zarrs' codec pipeline.

    zarrs reads local stores itself; arrays it cannot handle (a rare codec, a
    data type) fall back to zarr's own pipeline, as do stores behind a URL.
    """
    store = zarr_store(path, options, mode == "r", cache_bytes)
    if not isinstance(store, str):
        return zarr.open_array(store, mode=mode)  # type: ignore[arg-type]
    with _OPENING, warnings.catch_warnings(), zarr.config.set(FAST_PIPELINE):
        warnings.filterwarnings("ignore", "Array is unsupported by ZarrsCodecPipeline")
        return zarr.open_array(store, mode=mode)  # type: ignore[arg-type]


def filesystem(url: str, options: Options = None) -> tuple[Any, str]:
    """A synchronous fsspec filesystem for ``url`` (made in this process) and its path."""
    try:
        fs, path = _url_to_fs(url, options, asynchronous=False)
    except ImportError as e:  # s3fs, gcsfs or aiohttp missing
        raise InputError(
            f"no filesystem for {urlsplit(url).scheme}:// ({e})",
            url,
            "pip install 'blockpredict[cloud]'",
        ) from None
    fs.invalidate_cache()  # listings cached by an earlier call may be stale
    return fs, path


def _url_to_fs(url: str, options: Options, asynchronous: bool) -> tuple[Any, str]:
    """fsspec's filesystem for ``url``; for a GCS emulator, gcsfs's JSON-API class.

    Recent gcsfs (2026.10) first asks Google's gRPC control plane whether a bucket is
    zonal; an emulator (``STORAGE_EMULATOR_HOST`` or ``endpoint_url``) has no
    such service and each call would wait 60 s for it.
    """
    from fsspec.core import url_to_fs

    opts = dict(options or {})
    if urlsplit(url).scheme.lower() in ("gs", "gcs") and _gcs_emulator(opts):
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(asynchronous=asynchronous, **opts)
        return fs, fs._strip_protocol(url)
    fs, path = url_to_fs(url, asynchronous=asynchronous, **opts)
    return fs, path


def _gcs_emulator(options: Mapping[str, Any]) -> bool:
    endpoint = options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST", "")
    return bool(endpoint) and "googleapis.com" not in str(endpoint)


def exists(path: str | Path, options: Options = None) -> bool:
    """Whether a file, folder or any object under the prefix exists."""
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(str(path), options)
    return bool(retry(lambda: fs.exists(inner), str(path)))


def remove(path: str | Path, options: Options = None) -> None:
    """Delete a folder or every object under a prefix (``overwrite``)."""
    if not is_url(path):
        import shutil

        if Path(path).is_dir():
            shutil.rmtree(path)
        return
    fs, inner = filesystem(str(path), options)
    if retry(lambda: fs.exists(inner), str(path)):
        retry(lambda: fs.rm(inner, recursive=True), str(path))


def check_container(url: str, options: Options, role: str) -> None:
    """Raise :class:`InputError` for a missing bucket or container or denied credentials.

    ``role`` is ``input`` (the container must exist) or ``output`` (its bucket must).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in READ_ONLY_SCHEMES:
        return  # HTTP has no folders: a missing dataset shows when it is opened
    fs, inner = filesystem(url, options)
    bucket = inner.split("/", 1)[0]
    where = f"{role}.container"
    endpoint, credentials = HINTS.get(scheme, HINTS["s3"])
    try:
        try:
            retry(lambda: fs.ls(bucket, detail=False), url)
        except FileNotFoundError:
            raise InputError(
                f"bucket {bucket!r} not found", url, f"check {where} and the endpoint ({endpoint})"
            ) from None
        if role == "input" and not retry(lambda: fs.exists(inner), url):
            raise InputError(f"{role} container not found", url, f"check {where}")
    except InputError:
        raise
    except Exception as e:
        if is_denied(e):
            raise InputError(
                f"access denied to {role} container ({short(e)})",
                url,
                f"check the credentials ({credentials}) or {role}.storage_options",
            ) from None
        raise InputError(
            f"cannot reach the {role} store ({short(e)})",
            url,
            f"check the endpoint ({endpoint}), the network and the credentials",
        ) from None


# scheme: (where its endpoint is set, where its credentials come from)
HINTS = {
    "s3": ("AWS_ENDPOINT_URL", "AWS_* variables, ~/.aws"),
    "gs": (
        "STORAGE_EMULATOR_HOST or storage_options.endpoint_url",
        "gcloud auth application-default login, GOOGLE_APPLICATION_CREDENTIALS, "
        "storage_options.token",
    ),
}
HINTS["gcs"] = HINTS["gs"]


# --- the lock primitive: a conditional create -----------------------------------


def create_exclusive(url: str, data: bytes, options: Options = None) -> bool:
    """Create the object ``url`` holding ``data`` unless it exists; True if this call made it.

    On S3 this is one ``PutObject`` with ``If-None-Match: *``, on GCS one upload
    with ``ifGenerationMatch=0`` (the store answers 412 when the object exists):
    the store itself decides, so two runs can never both win, where it honours
    the condition (S3-compatible stores that ignore the header, and emulators,
    let both writes through). Other schemes check, then write, which cannot
    exclude two runs starting in the same moment.
    """
    fs, inner = filesystem(url, options)
    if urlsplit(url).scheme.lower() in CONDITIONAL_SCHEMES:
        try:
            retry(lambda: fs.pipe_file(inner, data, mode="create"), url)
            return True
        except FileExistsError:
            return False
    if retry(lambda: fs.exists(inner), url):
        return False
    retry(lambda: fs.pipe_file(inner, data), url)
    return True


def read_object(url: str, options: Options = None) -> bytes | None:
    """The bytes of one object, or None where it does not exist."""
    fs, inner = filesystem(url, options)
    try:
        return bytes(retry(lambda: fs.cat_file(inner), url))
    except FileNotFoundError:
        return None


def delete_object(url: str, options: Options = None) -> None:
    """Delete one object; a missing one is fine."""
    fs, inner = filesystem(url, options)
    try:
        retry(lambda: fs.rm_file(inner), url)
    except FileNotFoundError:
        pass
