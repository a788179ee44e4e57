"""Counted nouns in what users read: ``plural(1, "block")`` is ``1 block``, never ``1 blocks``."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and ``noun``, or ``nouns`` (default: ``noun + "s"``) unless ``count`` is 1.

    >>> plural(1, "worker"), plural(3, "block"), plural(0, "retry", "retries")
    ('1 worker', '3 blocks', '0 retries')
    """
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
