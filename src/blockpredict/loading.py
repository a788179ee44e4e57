"""Loading the model on the workers, overlapped with the client's own start-up.

:func:`start_loading` registers the model plugin on a thread of its own, so workers
import torch and load the model while the client creates the output and the ledger;
the runner waits on the :class:`Loading` before it dispatches the first block.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from distributed import Client, WorkerPlugin
from distributed.comm import CommClosedError

from .errors import BlockpredictError
from .job import describe
from .tasks import PLUGIN_NAME


class WorkerSetupError(BlockpredictError, RuntimeError):
    """The model could not be loaded on a worker (before any block ran)."""


@dataclass
class Loading:
    """The model being loaded on the workers (:func:`start_loading`), and since when."""

    started: float
    done: Future[None]

    def wait(self) -> float:
        """Until every worker holds the model (or raise its error); seconds since the start."""
        self.done.result()
        return time.perf_counter() - self.started


def start_loading(client: Client, plugin: WorkerPlugin) -> Loading:
    """Register the model plugin on a thread of its own and return at once.

    Workers import torch and load the model while the client goes on (creating
    the output, the ledger): start-up work overlaps instead of adding up.
    """
    loading = Loading(time.perf_counter(), Future())

    def register() -> None:
        try:
            _register(client, plugin)
        except BaseException as e:  # noqa: BLE001 (carried to whoever waits)
            loading.done.set_exception(e)
        else:
            loading.done.set_result(None)

    threading.Thread(target=register, name="blockpredict-load", daemon=True).start()
    return loading


def _register(client: Client, plugin: WorkerPlugin) -> None:
    """Load the model on every worker; a model that fails to load stops the run here."""
    try:
        results = client.register_plugin(plugin, name=PLUGIN_NAME) or {}
    except CommClosedError:  # the scheduler went away: not the model's fault
        raise
    except Exception as e:  # distributed re-raises the first worker's error as it is
        raise _setup_error("a worker", describe(e)) from e
    for worker, result in results.items():  # older distributed: an error in the reply
        if isinstance(result, dict) and result.get("status") == "error":
            error = result.get("exception")
            text = describe(error) if isinstance(error, BaseException) else str(error)
            raise _setup_error(f"worker {worker}", text)


def _setup_error(where: str, text: str) -> WorkerSetupError:
    return WorkerSetupError(
        f"the model could not be loaded on {where}: {text}",
        "model",
        "check that the workers can import and load the model",
    )
