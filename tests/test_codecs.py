"""Workers' block I/O goes through zarrs on local disks: it must read and write exactly
what zarr-python does, for the codecs users' arrays have, and fall back where zarrs
cannot (a codec or filter it lacks) without a warning in the worker's log."""

from __future__ import annotations

import warnings
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, TransposeCodec

from blockpredict.stores import open_array

LAYOUTS = {
    "v2 blosc zstd": dict(zarr_format=2, compressors=numcodecs.Blosc("zstd", 5, 2)),
    "v2 gzip": dict(zarr_format=2, compressors=numcodecs.GZip(5)),
    "v2 lz4 (not in zarrs)": dict(zarr_format=2, compressors=numcodecs.LZ4()),
    "v2 delta filter (not in zarrs)": dict(
        zarr_format=2, compressors=numcodecs.Zstd(), filters=[numcodecs.Delta(dtype="uint16")]
    ),
    "v3 gzip crc32c": dict(zarr_format=3, compressors=[GzipCodec(), Crc32cCodec()]),
    "v3 sharded": dict(zarr_format=3, shards=(32, 32, 32), compressors=BloscCodec(cname="lz4")),
    "v3 transposed": dict(zarr_format=3, filters=[TransposeCodec(order=(2, 1, 0))]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_block_io_reads_and_writes_what_zarr_does(tmp_path: Path, layout: str) -> None:
    path = str(tmp_path / "a.zarr")
    data = (np.random.default_rng(0).random((64, 64, 64)) * 1000).astype("uint16")
    array = zarr.create_array(
        path, shape=data.shape, chunks=(16, 16, 16), dtype="uint16", fill_value=0, **LAYOUTS[layout]
    )
    array[:32] = data[:32]  # the rest is never written: the fill value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback must not warn in every worker's log
        ours = open_array(path, None, "r+")
        np.testing.assert_array_equal(ours[5:60, 3:50, 7:63], array[5:60, 3:50, 7:63])
        ours[32:64, :32] = data[32:64, :32]  # whole chunks (and shards), as blocks write
    expected = np.zeros_like(data)
    expected[:32], expected[32:, :32] = data[:32], data[32:, :32]
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], expected)
