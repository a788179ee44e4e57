"""A container's location as written: a local path or a URL, and what makes a URL valid.

Pure string work, no I/O and no zarr: the workflow file is checked with it
before anything heavy is imported (stores.py opens what these name).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

SCHEMES = ("s3", "gs", "gcs", "http", "https", "file")
READ_ONLY_SCHEMES = ("http", "https")
BUCKET_SCHEMES = ("s3", "gs", "gcs")


def is_url(container: str | Path) -> bool:
    """True for ``scheme://...`` (a local path never contains ``://``)."""
    return isinstance(container, str) and "://" in container


def check_url(text: str) -> str:
    """The URL as given, or ``ValueError`` saying what is wrong with it."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported URL scheme {parts.scheme!r} in {text!r} "
            f"(use {', '.join(s + '://' for s in SCHEMES)} or a local path)"
        )
    if scheme != "file" and not parts.netloc:
        what = "bucket" if scheme in BUCKET_SCHEMES else "host"
        raise ValueError(f"{text!r} names no {what} (write {scheme}://{what}/path)")
    if scheme in BUCKET_SCHEMES and not _valid_bucket(parts.netloc):
        raise ValueError(f"{parts.netloc!r} is not a valid bucket name in {text!r}")
    return text


def _valid_bucket(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-._")
    return 3 <= len(name) <= 63 and set(name) <= allowed and name[0].isalnum()


def local_path(url: str) -> Path:
    """The path of a ``file://`` URL."""
    parts = urlsplit(url)
    return Path(parts.netloc + parts.path) if parts.netloc else Path(parts.path)


def join(container: str | Path, dataset: str) -> str:
    """A dataset inside a container, as a path or a URL."""
    if is_url(container):
        return str(container).rstrip("/") + "/" + dataset.strip("/")
    return os.path.join(str(container), dataset)
