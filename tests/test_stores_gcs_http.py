"""gs:// and http(s):// containers against real servers on 127.0.0.1, never the network.

GCS is gcp-storage-emulator's JSON API (tests/servers.py), reached the way a user
reaches an emulator: ``storage_options: {token: anon, endpoint_url: ...}``. HTTP is
python's ``http.server`` serving a zarr folder. Runs use the Python API on the
session's LocalCluster (2 worker processes that open the stores themselves);
bad input goes through the CLI's ``main`` in this process (it returns the exit code).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import make_input, mean_model, read_output
from servers import gcs_server, http_server

import blockpredict
from blockpredict import retries, stores
from blockpredict.cli import main
from blockpredict.lock import OutputLock, OutputLockedError
from blockpredict.loopback import LoopbackProxy

SHAPE = (34, 34, 34)  # output ROI 32^3: 4 x 4 x 4 = 64 blocks of 8^3


@pytest.fixture(scope="module")
def gcs() -> Iterator[dict]:
    """The emulator; yields the storage options a user would give for it."""
    with gcs_server() as endpoint:
        yield {"token": "anon", "endpoint_url": endpoint}


def gcsfs_(options: dict):
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(skip_instance_cache=True, **options)


@pytest.fixture
def data(tmp_path: Path) -> np.ndarray:
    """A float32 input at tmp_path/in.zarr/raw."""
    values = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    make_input(tmp_path / "in.zarr" / "raw", values, (1, 1, 1))
    return values


@pytest.fixture
def bucket(gcs: dict, tmp_path: Path, data: np.ndarray) -> str:
    """A new bucket holding a copy of the input."""
    name = f"bp-{uuid.uuid4().hex[:12]}"
    fs = gcsfs_(gcs)
    fs.mkdir(name)
    fs.put(str(tmp_path / "in.zarr"), f"{name}/in.zarr", recursive=True)
    return name


def run(cluster_address: str, input: str, output: str, options: dict | None = None, **execution):
    opts = {"storage_options": options} if options else {}
    return blockpredict.predict(
        mean_model(),
        input={"container": input, "dataset": "raw", **opts},
        output={"container": output, "dataset": "pred", **opts},
        cluster={"type": "address", "address": cluster_address},
        execution={"max_retries": 0, **execution},
        progress=False,
    )


def expected(data: np.ndarray) -> np.ndarray:
    return torch.nn.functional.avg_pool3d(torch.from_numpy(data)[None, None], 3, stride=1)[0]


def read_url(url: str, options: dict) -> np.ndarray:
    return zarr.open_array(stores.zarr_store(url, options, read_only=True), mode="r")[:]


# --- runs ------------------------------------------------------------------------------


def test_gs_run_equals_a_local_run_and_a_rerun_skips_every_block(
    tmp_path, cluster_address, gcs, bucket, data, monkeypatch
):
    """Input and output in the bucket; the ledger lies there and resume works from it."""
    monkeypatch.chdir(tmp_path)  # the event log of a URL output is kept locally, here
    local = run(cluster_address, str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"))
    url = f"gs://{bucket}/out.zarr"
    remote = run(cluster_address, f"gs://{bucket}/in.zarr", url, gcs)
    assert local.blocks_processed == remote.blocks_processed == 64
    got = read_url(f"{url}/pred/s0", gcs)
    np.testing.assert_array_equal(got, read_output(tmp_path / "out.zarr" / "pred"))
    np.testing.assert_allclose(got, expected(data), atol=1e-6)
    ledger = read_url(f"{url}/pred-ledger", gcs)
    assert ledger.shape == (64,) and (ledger == 1).all()
    assert not gcsfs_(gcs).exists(f"{bucket}/out.zarr/pred.lock")  # released
    again = run(cluster_address, f"gs://{bucket}/in.zarr", url, gcs)
    assert again.blocks_processed == 0 and again.blocks_skipped == 64


def test_the_gcs_lock_is_a_conditional_create(gcs, bucket, monkeypatch):
    """``ifGenerationMatch=0``: the store refuses a second lock (the emulator honours it here).

    Two runs that start together both see no lock when each request takes 0.5 s
    (a proxy adds it): only the store's condition lets exactly one of them win.
    The emulator is found the other documented way here, ``STORAGE_EMULATOR_HOST``.
    """
    url = f"gs://{bucket}/out.zarr/pred"
    options = {"token": "anon", "skip_instance_cache": True}
    with LoopbackProxy(gcs["endpoint_url"], delay=0.5) as slow:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", slow.endpoint)
        barrier = threading.Barrier(2)

        def attempt(n: int) -> bool:
            barrier.wait()
            return stores.create_exclusive(f"{url}-race.lock", b"%d" % n, options)

        with ThreadPoolExecutor(2) as pool:
            assert sorted(pool.map(attempt, range(2))) == [False, True]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs["endpoint_url"])
    first = OutputLock(url, options)
    first.acquire()
    with pytest.raises(OutputLockedError, match="another run writes this output"):
        OutputLock(url, options).acquire()
    first.release()
    assert stores.read_object(url + ".lock", options) is None
    assert stores.create_exclusive(url + ".lock", b"mine", options)


def test_http_input_with_transient_errors_equals_a_local_run(
    tmp_path, cluster_address, data, monkeypatch
):
    """The input served over HTTP behind a proxy that answers 503 to one request in five.

    fsspec's HTTP filesystem does not retry: every 503 reaches blockpredict's
    retries inside the read, and no block is retried as a whole.
    """
    monkeypatch.chdir(tmp_path)
    local = run(cluster_address, str(tmp_path / "in.zarr"), str(tmp_path / "local.zarr"))
    with http_server(tmp_path) as base, LoopbackProxy(base, fail_every=5) as proxy:
        report = run(cluster_address, f"{proxy.endpoint}/in.zarr", str(tmp_path / "out.zarr"))
    assert proxy.failures >= 2  # the run really met errors (few requests: chunks are cached)
    assert report.blocks_processed == local.blocks_processed == 64 and report.retries == 0
    got = read_output(tmp_path / "out.zarr" / "pred")
    np.testing.assert_array_equal(got, read_output(tmp_path / "local.zarr" / "pred"))


# --- bad input: one line, exit code 2, nothing written ------------------------------------


def workflow(folder: Path, input: str, output: str, gcs: dict) -> Path:
    def section(container: str, dataset: str) -> dict:
        opts = {"storage_options": gcs} if container.startswith("gs:") else {}
        return {"container": container, "dataset": dataset, **opts}

    raw = {
        "input": section(input, "raw"),
        "model": {
            "factory": "torch.nn:AvgPool3d",
            "kwargs": {"kernel_size": 3, "stride": 1},
            "input_shape": [10, 10, 10],
            "num_in_channels": 1,
            "num_out_channels": 1,
        },
        "output": section(output, "pred"),
        "cluster": {"type": "local", "n_workers": 1},
    }
    path = folder / "wf.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "input, output, phrase",
    [
        ("{http}/in.zarr", "out.zarr", None),  # the valid case: it plans
        ("{http}/missing.zarr", "out.zarr", "input dataset 'raw' not found"),
        ("{http}/in.zarr", "{http}/out.zarr", "http:// is read-only"),
        ("gs://no-such-bucket/in.zarr", "gs://{b}/out.zarr", "bucket 'no-such-bucket' not found"),
        ("gs://{b}/in.zarr", "gs://no-such-bucket/out.zarr", "bucket 'no-such-bucket' not found"),
        ("gs://{b}/missing.zarr", "gs://{b}/out.zarr", "input container not found"),
        ("gs:///in.zarr", "gs://{b}/out.zarr", "names no bucket"),
    ],
    ids=[
        "valid",
        "http-missing-key",
        "http-output",
        "gs-missing-input-bucket",
        "gs-missing-output-bucket",
        "gs-missing-key",
        "gs-no-bucket",
    ],
)
def test_bad_gs_and_http_input(tmp_path, gcs, bucket, capsys, input, output, phrase):
    with http_server(tmp_path) as base:
        urls = {"http": base, "b": bucket}
        path = workflow(tmp_path, input.format(**urls), output.format(**urls), gcs)
        report = ["--report", str(tmp_path / "report.json")]
        code = main(["plan", str(path)] if phrase is None else ["predict", str(path), *report])
    err = capsys.readouterr().err
    if phrase is None:
        assert code == 0, err
        return
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], lines[0]
    assert not (tmp_path / "report.json").exists()
    assert not (tmp_path / "out.zarr").exists()
    assert not gcsfs_(gcs).exists(f"{bucket}/out.zarr")


def test_gcs_and_http_errors_are_told_transient_or_not():
    """gcsfs's and aiohttp's exception types: 5xx, 429 and resets are retried, 404 and 403 not."""
    import aiohttp
    import requests
    from gcsfs.retry import HttpError

    assert retries.is_transient(HttpError({"code": 503, "message": "Service Unavailable"}))
    assert retries.is_transient(HttpError({"code": 429, "message": "rateLimitExceeded"}))
    assert retries.is_transient(HttpError({"code": 500, "message": "backendError"}))
    assert retries.is_transient(requests.exceptions.ProxyError())  # gcsfs's 502
    assert retries.is_transient(aiohttp.ServerDisconnectedError())
    info = aiohttp.RequestInfo(aiohttp.client_reqrep.URL("http://h/k"), "GET", {}, None)
    assert retries.is_transient(aiohttp.ClientResponseError(info, (), status=503))
    assert not retries.is_transient(aiohttp.ClientResponseError(info, (), status=403))
    assert not retries.is_transient(HttpError({"code": 401, "message": "Invalid Credentials"}))
    assert not retries.is_transient(OSError("Forbidden: b/bkt/o\nno access"))  # gcsfs's 403
    assert retries.is_denied(OSError("Forbidden: b/bkt/o\nno access"))
    assert retries.is_denied(HttpError({"code": 401, "message": "Invalid Credentials"}))
