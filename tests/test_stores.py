"""Containers in an object store: a real S3 API (moto's server) on 127.0.0.1, never the network.

Runs go through the real CLI in a subprocess, with ``AWS_ENDPOINT_URL`` pointing at
the server and dummy keys, and a LocalCluster of 2 worker processes that open the
store themselves.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import cli_process as cli
from conftest import (
    make_input,
    mean_model,
    read_output,
    worker_processes,
    write_factory,
    write_workflow,
)
from s3server import moto_server, set_auth

import blockpredict
from blockpredict import retries, stores
from blockpredict.cache import ChunkCache
from blockpredict.environment import process_environment
from blockpredict.loopback import LoopbackProxy

SRC = str(Path(__file__).resolve().parents[1] / "src")
SHAPE = (34, 34, 34)  # output ROI 32^3: 4 x 4 x 4 = 64 blocks of 8^3
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
NO_BOTO_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto on loopback; this process talks to it through the standard AWS variables."""
    with moto_server() as url, process_environment({**AWS, "AWS_ENDPOINT_URL": url}):
        yield url


def s3fs_() -> object:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def bucket(endpoint: str) -> str:
    name = f"bp-{uuid.uuid4().hex[:12]}"
    s3fs_().mkdir(name)
    return name


@pytest.fixture
def setup(tmp_path: Path, bucket: str) -> tuple[Path, str, np.ndarray]:
    """The factory module, a float32 input on disk and the same input in the bucket."""
    write_factory(tmp_path, "mean")
    data = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
    s3fs_().put(str(tmp_path / "in.zarr"), f"{bucket}/in.zarr", recursive=True)
    return tmp_path, bucket, data


def workflow(
    folder: Path,
    input: str,
    output: str,
    delay: float = 0.0,
    name: str = "wf.yaml",
    storage_options: dict | None = None,
    execution: dict | None = None,
) -> Path:
    options = {"storage_options": storage_options} if storage_options else {}
    raw = {
        "input": {"container": input, "dataset": "raw", **options},
        "model": {"factory": "mean:build", "kwargs": {"delay": delay}},
        "output": {"container": output, "dataset": "pred", **options},
        "cluster": {"type": "local", "n_workers": 2},
        "execution": {"max_retries": 1, **(execution or {})},
    }
    return write_workflow(folder / name, raw)


def predict(path: Path, report: str = "report.json", **env: str) -> dict:
    proc = cli("predict", str(path), "--report", report, "--no-progress", cwd=path.parent, env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads((path.parent / report).read_text())


def read_url(url: str, options: dict | None = None) -> np.ndarray:
    return zarr.open_array(stores.zarr_store(url, options, read_only=True), mode="r")[:]


def expected(data: np.ndarray) -> np.ndarray:
    return torch.nn.functional.avg_pool3d(torch.from_numpy(data)[None, None], 3, stride=1)[0, 0]


def ledger_done(url: str) -> int:
    try:
        return int((read_url(url) == 1).sum())
    except Exception:
        return 0


# --- runs ----------------------------------------------------------------------


def test_s3_run_equals_a_local_run_and_a_rerun_skips_every_block(
    setup, cluster_address, capsys, monkeypatch
):
    """The ledger lies in the bucket, and resume (and ``status``) work from it.

    The S3 run is the real CLI in a subprocess, reaching moto through the standard
    AWS variables; the local reference runs on the session's cluster, and the rerun
    and ``status`` go through the CLI's ``main`` in this process (same variables).
    """
    from blockpredict.cli import main

    tmp_path, bucket, data = setup
    monkeypatch.chdir(tmp_path)
    local = blockpredict.predict(
        mean_model(),
        input={"container": str(tmp_path / "in.zarr"), "dataset": "raw"},
        output={"container": str(tmp_path / "out.zarr"), "dataset": "pred"},
        cluster={"type": "address", "address": cluster_address},
        progress=False,
    )
    path = workflow(tmp_path, f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr")
    remote = predict(path)
    assert local.blocks_processed == remote["blocks_processed"] == 64
    got = read_url(f"s3://{bucket}/out.zarr/pred/s0")
    np.testing.assert_array_equal(got, read_output(tmp_path / "out.zarr" / "pred"))
    np.testing.assert_allclose(got[0], expected(data), atol=1e-6)
    ledger = read_url(f"s3://{bucket}/out.zarr/pred-ledger")
    assert ledger.shape == (64,) and (ledger == 1).all()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".zarr") == [
        "in.zarr",
        "out.zarr",
    ]  # the S3 run wrote nothing local but its report
    report = tmp_path / "again.json"
    assert main(["predict", str(path), "--report", str(report), "--no-progress"]) == 0
    again = json.loads(report.read_text())
    assert again["blocks_processed"] == 0 and again["blocks_skipped"] == 64
    capsys.readouterr()
    assert main(["status", str(path)]) == 0
    assert "done: 64/64" in capsys.readouterr().out


def test_a_killed_worker_loses_nothing_with_the_output_in_s3(setup):
    tmp_path, bucket, data = setup
    path = workflow(tmp_path, f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr", delay=0.15)
    proc = cli("predict", str(path), "--report", "report.json", "--no-progress", cwd=tmp_path)
    deadline = time.time() + 120
    while ledger_done(f"s3://{bucket}/out.zarr/pred-ledger") < 4 and time.time() < deadline:
        time.sleep(0.2)
    workers = worker_processes(proc.pid)
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["blocks_processed"] == 64 and report["blocks_failed"] == 0
    np.testing.assert_allclose(
        read_url(f"s3://{bucket}/out.zarr/pred/s0")[0], expected(data), atol=1e-6
    )


def test_transient_errors_are_retried_inside_the_read_and_the_write(
    setup, endpoint, cluster_address, monkeypatch
):
    """One request in ten answers 503; botocore's own retries are off and so are block retries.

    Through the Python API on the session's cluster: its workers were started before
    moto, so the endpoint and keys travel as storage options.
    """
    tmp_path, bucket, data = setup
    monkeypatch.chdir(tmp_path)  # the event log of a URL output is kept locally, here
    with LoopbackProxy(endpoint, fail_every=10) as proxy:
        options = {
            "key": AWS["AWS_ACCESS_KEY_ID"],
            "secret": AWS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": proxy.endpoint, "region_name": "us-east-1"},
            **NO_BOTO_RETRIES,
        }
        report = blockpredict.predict(
            mean_model(),
            input={
                "container": f"s3://{bucket}/in.zarr",
                "dataset": "raw",
                "storage_options": options,
            },
            output={
                "container": f"s3://{bucket}/out.zarr",
                "dataset": "pred",
                "storage_options": options,
            },
            cluster={"type": "address", "address": cluster_address},
            execution={"max_retries": 0},
            progress=False,
        )
    assert proxy.failures >= 10  # the run really met errors
    assert report.blocks_processed == 64 and report.retries == 0
    np.testing.assert_allclose(
        read_url(f"s3://{bucket}/out.zarr/pred/s0")[0], expected(data), atol=1e-6
    )


# --- bad input: one line, exit code 2, nothing written -------------------------------


def bad(path: Path, phrase: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's ``main`` in this process (it returns the exit code): one line, exit 2."""
    from blockpredict.cli import main

    code = main(["predict", str(path), "--report", str(path.parent / "report.json")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], lines[0]
    assert not (path.parent / "report.json").exists()


def nothing_in(bucket: str, prefix: str = "out.zarr") -> bool:
    return not s3fs_().exists(f"{bucket}/{prefix}")


@pytest.mark.parametrize(
    "input, output, phrase",
    [
        ("s3://no-such-bucket/in.zarr", "s3://{b}/out.zarr", "bucket 'no-such-bucket' not found"),
        ("s3://{b}/in.zarr", "s3://no-such-bucket/out.zarr", "bucket 'no-such-bucket' not found"),
        ("s3://{b}/missing.zarr", "s3://{b}/out.zarr", "input container not found"),
        ("s3://{b}/in.zarr", "https://example.org/out.zarr", "https:// is read-only"),
        ("s3:///in.zarr", "s3://{b}/out.zarr", "names no bucket"),
        ("sftp://host/in.zarr", "s3://{b}/out.zarr", "unsupported URL scheme"),
    ],
    ids=[
        "missing-input-bucket",
        "missing-output-bucket",
        "missing-key",
        "http-output",
        "no-bucket",
        "unknown-scheme",
    ],
)
def test_bad_store_input(setup, capsys, input, output, phrase):
    tmp_path, bucket, _ = setup
    path = workflow(tmp_path, input.format(b=bucket), output.format(b=bucket))
    bad(path, phrase, capsys)
    assert nothing_in(bucket)


def test_missing_dataset_in_the_bucket(setup, capsys):
    tmp_path, bucket, _ = setup
    path = workflow(tmp_path, f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr")
    path.write_text(path.read_text().replace("dataset: raw", "dataset: nothere"))
    bad(path, "input dataset 'nothere' not found", capsys)
    assert nothing_in(bucket)


def test_wrong_credentials(setup, endpoint, monkeypatch, capsys):
    """moto checks keys against its IAM users once told to (moto-api/reset-auth).

    A whole run with a valid key and auth on is not possible against moto 5.2:
    it recomputes SigV4 from the decoded query, so any query value holding "/"
    (s3fs lists with ``delimiter=/`` and ``prefix=path/``) fails with
    SignatureDoesNotMatch whatever the key; boto3's own ``list_objects_v2(...,
    Delimiter="/")`` fails the same way. Object reads pass, so a valid IAM key
    reading an object is the control that the refusal is about the key.
    """
    import boto3
    import s3fs

    tmp_path, bucket, _ = setup
    path = workflow(tmp_path, f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr")
    iam = boto3.client("iam")
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.attach_user_policy(UserName=user, PolicyArn=admin_policy(iam))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    valid = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    zarr_json = f"s3://{bucket}/in.zarr/raw/zarr.json"
    set_auth(endpoint, True)
    try:
        assert stores.read_object(zarr_json, {**valid, "skip_instance_cache": True})
        with pytest.raises(PermissionError):
            stores.read_object(zarr_json, {"key": "wrong", "secret": "x"})
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
        s3fs.S3FileSystem.clear_instance_cache()  # instances made with the test keys
        denied = "access denied to input container (PermissionError: The AWS Access Key Id"
        bad(path, denied, capsys)  # moto's InvalidAccessKeyId: the key, not the signature
    finally:
        set_auth(endpoint, False)
        s3fs.S3FileSystem.clear_instance_cache()  # instances made with the wrong keys
    assert nothing_in(bucket)


def admin_policy(iam) -> str:
    document = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    name = f"all-{uuid.uuid4().hex[:8]}"
    return iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(document))["Policy"]["Arn"]


# --- the store primitives ------------------------------------------------------------------


def test_create_exclusive_lets_one_caller_win(bucket):
    url = f"s3://{bucket}/out.zarr/pred.lock"
    assert stores.create_exclusive(url, b"run 1")
    assert not stores.create_exclusive(url, b"run 2")
    assert stores.read_object(url) == b"run 1"
    stores.delete_object(url)
    assert stores.read_object(url) is None
    stores.delete_object(url)  # deleting twice is fine
    assert stores.create_exclusive(url, b"run 3")


def test_a_ledger_in_the_bucket_round_trips_and_refuses_another_geometry(bucket):
    from blockpredict.ledger import DONE, Ledger, LedgerMismatchError

    url = f"s3://{bucket}/out.zarr/pred-ledger"
    assert not Ledger.exists(url)
    ledger = Ledger.create(url, {"plan": 1}, 10)
    ledger.mark(3, DONE)
    ledger.flush()
    assert Ledger.exists(url)
    assert Ledger.open(url, {"plan": 1}).counts()["done"] == 1
    with pytest.raises(LedgerMismatchError):
        Ledger.open(url, {"plan": 2})
    stores.remove(f"s3://{bucket}/out.zarr")
    assert not stores.exists(url)


def test_transient_errors_are_told_from_permanent_ones():
    from botocore.exceptions import ClientError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "op"
        )

    assert retries.is_transient(client_error(503, "SlowDown"))
    assert retries.is_transient(client_error(500, "InternalError"))
    assert retries.is_transient(ConnectionResetError())
    assert retries.is_transient(OSError(16, "Service Unavailable"))  # s3fs: 503, SlowDown
    assert retries.is_transient(OSError(5, "InternalError"))
    assert not retries.is_transient(FileNotFoundError("no such key"))
    assert not retries.is_transient(PermissionError("denied"))
    assert not retries.is_transient(client_error(404, "NoSuchKey"))
    assert not retries.is_transient(ValueError("bug"))
    delays = [retries.backoff_delay(n) for n in range(30)]
    assert all(0 <= d <= retries.CAP_S for d in delays)


def test_the_chunk_cache_serves_repeated_reads_and_stays_bounded(setup):
    _, bucket, data = setup
    inner = stores.zarr_store(f"s3://{bucket}/in.zarr/raw", read_only=True)
    cache = ChunkCache(inner, max_bytes=1 << 20)
    array = zarr.open_array(cache, mode="r")
    np.testing.assert_array_equal(array[:], data)
    misses = cache.misses
    np.testing.assert_array_equal(array[:10], data[:10])
    assert cache.misses == misses and cache.hits > 0
    assert cache.nbytes <= cache.max_bytes


def test_urls_bypass_path_resolution(tmp_path):
    from blockpredict.config import load_workflow

    path = workflow(tmp_path, "s3://bkt/in.zarr", "file:///data/out.zarr")
    loaded = load_workflow(path)
    assert loaded.input.container == "s3://bkt/in.zarr"
    assert loaded.output.container == Path("/data/out.zarr")
    relative = load_workflow(workflow(tmp_path, "in.zarr", "out.zarr", name="rel.yaml"))
    assert relative.input.container == tmp_path.resolve() / "in.zarr"


def test_bench_store_reports_what_the_cache_saves(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "blockpredict.cli", "bench", "--store", "2", "--json", "b.json"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "the cache saves" in result.stdout
    off, on = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert on["requests"] < off["requests"]
