"""Where an output may be written: never in the input, and somewhere writable.

Both are checked before anything is written or any cluster starts, so that a bad
location is one line and exit code 2 (``plan`` checks them too).
"""

from __future__ import annotations

import os
import tempfile

from .errors import ConfigError, OutputError
from .ledger import ledger_path
from .urls import is_url


def check_not_input(input_path: str, out_path: str) -> None:
    """The input is only ever read: refuse an output or ledger that is, holds or lies in it.

    Local paths are compared resolved (``..``, symbolic links); URLs as written.
    """
    source = _resolved(input_path)
    for what, path in (("output", out_path), ("ledger", ledger_path(out_path))):
        target = _resolved(path)
        if target == source or _inside(target, source) or _inside(source, target):
            relation = "is"
            if target != source:
                relation = "contains" if _inside(source, target) else "lies inside"
            raise ConfigError(
                f"the {what} {relation} the input {input_path}",
                f"output.container/output.dataset {out_path}",
                "write the output to another dataset or container",
            )


def _resolved(path: str) -> str:
    return str(path).rstrip("/") if is_url(path) else os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/" + os.sep) + "/")


def check_writable(out_path: str) -> None:
    """The output's folder can be created and written (tried, then removed).

    A URL output is checked against its store instead (``stores.check_container``).
    """
    if is_url(out_path):
        return
    problem = writable_problem(os.path.dirname(os.path.abspath(out_path)))
    if problem:
        raise OutputError(
            f"the output cannot be written: {problem}",
            "output.container",
            "choose a writable location",
        )


def writable_problem(folder: str) -> str | None:
    """Why files cannot be made in ``folder`` (or the folders to create there), or None."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".blockpredict-check-", dir=existing))
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror or e})"
    return None
