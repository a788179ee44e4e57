"""``blockpredict bench --store``: what the per-worker chunk cache saves against a slow store.

A local S3 endpoint (moto's server, from the ``test`` extra) behind a proxy on
127.0.0.1 that delays every request, as a distant object store would. One
reader goes through every block of a plan in Morton order, as one worker
does, once without the chunk cache and once with it; the figures are the
requests the store answered and the seconds spent reading.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import replace
from typing import Any

import numpy as np
from funlib.geometry import Coordinate

from .cache import DEFAULT_BYTES
from .loopback import LoopbackProxy
from .order import morton_order
from .plan import make_plan
from .storage import BlockReader, open_input

KEYS = {"key": "bench", "secret": "bench"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_store(delay_ms: float = 20.0, size: int = 128, chunk: int = 32) -> dict[str, Any]:
    """Read every block of a 48^3-read / 32^3-write plan over a ``size``^3 uint8 input."""
    from moto.server import ThreadedMotoServer

    from .stores import zarr_store

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request lines
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = LoopbackProxy(f"http://127.0.0.1:{port}", delay=delay_ms / 1000)
    try:
        direct = {**KEYS, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        slow = {**KEYS, "client_kwargs": {"endpoint_url": proxy.endpoint}}
        url = "s3://bench/in.zarr"
        _write_input(zarr_store, url, direct, size, chunk)
        info = open_input(url, "raw", storage_options=slow)
        plan = make_plan(
            input_roi=info.roi,
            input_voxel_size=info.voxel_size,
            output_voxel_size=info.voxel_size,
            eval_input_shape=Coordinate(48, 48, 48),
            eval_output_shape=Coordinate(32, 32, 32),
            requested_roi=None,
            border="valid",
            phase=None,
        )
        rows = []
        for cache_bytes in (0, DEFAULT_BYTES):
            reader = BlockReader(replace(info, cache_bytes=cache_bytes), "auto")
            _ = reader.array  # open (metadata requests) before counting
            before, start = proxy.requests, time.perf_counter()
            for block_id in morton_order(plan.grid_shape):
                reader.read(plan.block(block_id).read_roi)
            rows.append(
                {
                    "cache_mib": cache_bytes >> 20,
                    "requests": proxy.requests - before,
                    "seconds": time.perf_counter() - start,
                }
            )
        return {
            "delay_ms": delay_ms,
            "input": [size] * 3,
            "chunks": [chunk] * 3,
            "read_shape": [48] * 3,
            "blocks": plan.num_blocks,
            "runs": rows,
        }
    finally:
        proxy.close()
        server.stop()


def _write_input(zarr_store: Any, url: str, options: dict, size: int, chunk: int) -> None:
    import s3fs
    from funlib.persistence import prepare_ds

    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(url.split("/")[2])
    array = prepare_ds(
        zarr_store(url + "/raw", options),
        shape=(size,) * 3,
        voxel_size=Coordinate(1, 1, 1),
        axis_names=["z", "y", "x"],
        chunk_shape=(chunk,) * 3,
        dtype=np.uint8,
        mode="w",
    )
    array._source_data[:] = np.random.default_rng(0).integers(0, 256, (size,) * 3, dtype=np.uint8)


def format_store(result: dict[str, Any]) -> str:
    """The store figures as lines for the terminal."""
    lines = [
        f"object store (local S3 endpoint, {result['delay_ms']:g} ms added per request): "
        f"{result['blocks']} blocks of {result['read_shape'][0]}^3 reads, "
        f"chunks {result['chunks'][0]}^3, one reader in Morton order"
    ]
    for row in result["runs"]:
        label = f"cache {row['cache_mib']} MiB" if row["cache_mib"] else "no cache"
        lines.append(f"  {label:>14}: {row['requests']:5d} requests, {row['seconds']:.2f} s")
    off, on = result["runs"]
    if off["requests"]:
        saved = 1 - on["requests"] / off["requests"]
        lines.append(
            f"  the cache saves {saved:.0%} of requests, {off['seconds'] - on['seconds']:.2f} s"
        )
    return "\n".join(lines)
