"""Outputs the ecosystem opens: OME-NGFF images, shards, pyramids, channel groups, OME inputs.

Real LocalCluster worker processes, real zarr on disk, read back with the
``ome-zarr`` reader and funlib.persistence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import (
    alive_checkpoint,
    make_input,
    max_abs_diff,
    read_output,
    volume_of,
    write_workflow,
)
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds
from test_bad_input import Project, assert_rejected

import blockpredict
from blockpredict.architectures import WrappedArchitecture
from blockpredict.config import load_workflow
from blockpredict.model import Model
from blockpredict.pyramid import downsample
from blockpredict.report import RunReport
from blockpredict.workflow import predict_workflow, prepare_workflow


def smooth_model(channels: int = 1, size: int = 18) -> Model:
    """3^3 mean filter; channel i is that mean times (i + 1) / channels. 18^3 in, 16^3 out."""
    conv = torch.nn.Conv3d(1, channels, 1)
    with torch.no_grad():
        conv.weight[:] = torch.arange(1, channels + 1).reshape(channels, 1, 1, 1, 1) / channels
        conv.bias.zero_()
    module = torch.nn.Sequential(torch.nn.AvgPool3d(3, stride=1), conv)
    arch = WrappedArchitecture(module, (size,) * 3, num_in_channels=1, num_out_channels=channels)
    return Model(arch, torch.nn.Identity())


def run_smooth(
    tmp_path: Path,
    cluster: dict[str, Any],
    output: dict[str, Any],
    channels: int = 1,
    shape: tuple[int, ...] = (34, 34, 34),
    voxel_size: tuple[int, ...] = (1, 1, 1),
    offset: tuple[int, ...] | None = None,
    input_dataset: str = "raw",
) -> RunReport:
    if input_dataset == "raw":
        make_input(tmp_path / "in.zarr" / "raw", volume_of(shape), voxel_size, offset)
    report = blockpredict.predict(
        smooth_model(channels),
        input={"container": str(tmp_path / "in.zarr"), "dataset": input_dataset},
        output={"container": str(tmp_path / "out.zarr"), **output},
        cluster=cluster,
        execution={"max_retries": 0},
        progress=False,
    )
    assert report.exit_code == 0, report.summary()
    return report


def ome_levels(path: Path) -> list[tuple[list[float], list[float], tuple[int, ...]]]:
    """(scale, translation, shape) of every level, as the ome-zarr reader reports them."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    location = parse_url(str(path))
    assert location is not None, f"ome-zarr does not recognise {path}"
    nodes = list(Reader(location)())
    image = nodes[0]
    assert image.load(Multiscales) is not None, "not read as a multiscale image"
    levels = []
    for transforms, data in zip(image.metadata["coordinateTransformations"], image.data):
        scale = next(t["scale"] for t in transforms if t["type"] == "scale")
        translation = next(t["translation"] for t in transforms if t["type"] == "translation")
        levels.append((scale, translation, tuple(data.shape)))
    return levels


def reference_pyramid(data: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """Mean over whole ``factor`` windows by reshaping (shapes divisible)."""
    c, *spatial = data.shape
    shape = [c]
    for s, f in zip(spatial, factor):
        shape += [s // f, f]
    mean = data.astype(np.float64).reshape(shape).mean(axis=(2, 4, 6))
    if data.dtype == np.uint8:
        return np.rint(mean).astype(np.uint8)
    return mean.astype(data.dtype)


UPSAMPLING_UNET = {
    "input_shape": [28, 28, 28],
    "fmaps_in": 1,
    "num_fmaps": 3,
    "fmap_inc_factor": 2,
    "downsample_factors": [[2, 2, 2]],
    "upsample_factors": [[2, 2, 2]],
}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_readers_see_every_level_of_an_upsampling_unet(tmp_path, cluster_address, zarr_format):
    """ome-zarr and funlib read scale = voxel size and translation = offset at every level."""
    make_input(tmp_path / "in.zarr" / "raw", volume_of((40, 40, 40)), (8, 8, 8), (80, 0, 40))
    workflow = {
        "input": {"container": "in.zarr", "dataset": "raw"},
        "model": alive_checkpoint(tmp_path, {"unet": UPSAMPLING_UNET, "head": {"out_channels": 2}}),
        "output": {
            "container": "out.zarr",
            "dataset": "pred",
            "zarr_format": zarr_format,
            "multiscale": 2,
        },
        "cluster": {"type": "address", "address": cluster_address},
        "execution": {"max_retries": 0},
    }
    loaded = load_workflow(write_workflow(tmp_path / "workflow.yaml", workflow))
    plan = prepare_workflow(loaded).plan
    assert plan.output_voxel_size == Coordinate(4, 4, 4)
    assert predict_workflow(loaded, progress=False).exit_code == 0
    image = tmp_path / "out.zarr" / "pred"
    offset = [float(o) for o in plan.output_roi.offset]
    full = tuple(plan.output_shape)
    expected = [
        ([1.0, 4.0 * f, 4.0 * f, 4.0 * f], [0.0, *offset], (2, *(-(-s // f) for s in full)))
        for f in (1, 2, 4)
    ]
    assert ome_levels(image) == expected
    attrs = zarr.open_group(str(image), mode="r").attrs.asdict()
    version = attrs["multiscales"][0]["version"] if zarr_format == 2 else attrs["ome"]["version"]
    assert version == ("0.4" if zarr_format == 2 else "0.5")
    axes = (attrs["multiscales"][0] if zarr_format == 2 else attrs["ome"]["multiscales"][0])["axes"]
    assert [a["type"] for a in axes] == ["channel", "space", "space", "space"]
    for k, f in enumerate((1, 2, 4)):
        array = open_ds(str(image / f"s{k}"))
        assert array.voxel_size == Coordinate(4 * f, 4 * f, 4 * f)
        assert array.offset == plan.output_roi.offset
        assert array.channel_dims == 1
        assert zarr.open_array(str(image / f"s{k}")).metadata.zarr_format == zarr_format


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_each_pyramid_level_is_a_downsampling_of_the_full_resolution(
    tmp_path, cluster_address, dtype
):
    run_smooth(
        tmp_path,
        {"type": "address", "address": cluster_address},
        {"dataset": "pred", "dtype": dtype, "multiscale": 3, "multiscale_factors": [1, 2, 2]},
        shape=(34, 34, 34),
        voxel_size=(4, 2, 2),
    )
    image = tmp_path / "out.zarr" / "pred"
    full = zarr.open_array(str(image / "s0"))[:]
    assert full.dtype == np.dtype(dtype) and full.shape == (1, 32, 32, 32)
    assert full.std() > 0
    for k in (1, 2, 3):
        level = zarr.open_array(str(image / f"s{k}"))[:]
        expected = reference_pyramid(full, (1, 2**k, 2**k))
        assert level.shape == expected.shape
        assert max_abs_diff(level, expected) <= (1e-6 if dtype == "float32" else 0)
        assert open_ds(str(image / f"s{k}")).voxel_size == Coordinate(4, 2 * 2**k, 2 * 2**k)


def test_partial_windows_average_the_voxels_they_have():
    data = np.array([[[1.0, 2.0, 3.0, 4.0, 10.0]]], dtype=np.float32)  # (C, 1, 5)
    assert downsample(data, (1, 2)).tolist() == [[[1.5, 3.5, 10.0]]]
    ints = np.array([[[1, 2, 2, 2, 7]]], dtype=np.uint8)
    assert downsample(ints, (1, 2)).tolist() == [[[2, 2, 7]]]  # 1.5 rounds to even


def test_channel_groups_equal_the_channels_of_a_single_array(tmp_path, cluster_address):
    cluster = {"type": "address", "address": cluster_address}
    run_smooth(tmp_path / "a", cluster, {"dataset": "all"}, channels=3)
    run_smooth(
        tmp_path / "b",
        cluster,
        {
            "datasets": {
                "first": {"channels": [0, 1], "dtype": "float32"},
                "rest": {"channels": [1, 3], "dtype": "uint8"},
            },
            "range": [0.2, 0.6],
            "multiscale": 1,
        },
        channels=3,
    )
    single = read_output(tmp_path / "a" / "out.zarr" / "all")
    first = read_output(tmp_path / "b" / "out.zarr" / "first")
    rest = read_output(tmp_path / "b" / "out.zarr" / "rest")
    assert max_abs_diff(first, single[0:1]) <= 1e-6
    assert rest.dtype == np.uint8
    expected = np.clip(np.rint((single[1:3] - np.float32(0.2)) * np.float32(255 / 0.4)), 0, 255)
    assert max_abs_diff(rest, expected) <= 1  # float32 rounding at .5 may differ by one step
    assert int(rest.max()) - int(rest.min()) > 100  # the range spreads the values
    assert (tmp_path / "b" / "out.zarr" / "predictions-ledger").exists()  # one shared ledger
    levels = ome_levels(tmp_path / "b" / "out.zarr" / "rest")
    assert [s for s, _, _ in levels] == [[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 2.0, 2.0]]


def test_sharded_run_with_4_workers_writes_one_shard_per_block(tmp_path, cluster_address):
    reference_dir = tmp_path / "reference"
    run_smooth(
        reference_dir,
        {"type": "address", "address": cluster_address},
        {"dataset": "pred", "zarr_format": 2},
        shape=(66, 66, 34),
    )
    sharded = tmp_path / "sharded"
    report = run_smooth(
        sharded,
        {"type": "local", "n_workers": 4, "threads_per_worker": 1},
        {"dataset": "pred", "zarr_format": 3, "chunk_shape": [8, 8, 4]},
        shape=(66, 66, 34),
    )
    assert report.blocks_total == 4 * 4 * 2
    got = read_output(sharded / "out.zarr" / "pred")
    assert max_abs_diff(got, read_output(reference_dir / "out.zarr" / "pred")) == 0
    array = zarr.open_array(str(sharded / "out.zarr" / "pred" / "s0"))
    assert array.shards == (1, 16, 16, 16) and array.chunks == (1, 8, 8, 4)
    shard_files = [
        p for p in (sharded / "out.zarr" / "pred" / "s0" / "c").rglob("*") if p.is_file()
    ]
    assert len(shard_files) == report.blocks_total


def write_ome_input(folder: Path, volume: np.ndarray, zarr_format: int) -> None:
    """A multiscale image as ome-zarr (0.18) writes it: s0 at voxel 2 nm, s1 at 4 and s2 at
    8, each level shifted by half a voxel of the one below (pixel centres): translations
    0, 1 and 3 nm."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(folder / "in.zarr"), mode="w", zarr_format=zarr_format)
    image = group.create_group("raw")
    write_image(
        volume,
        image,
        scale_factors=[{"z": 2, "y": 2, "x": 2}, {"z": 4, "y": 4, "x": 4}],
        axes="zyx",
        scale={"z": 2.0, "y": 2.0, "x": 2.0},
        axes_units={"z": "nanometer", "y": "nanometer", "x": "nanometer"},
        fmt=FormatV04() if zarr_format == 2 else FormatV05(),
    )


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_input_level_gives_voxel_size_and_offset(tmp_path, cluster_address, zarr_format):
    volume = volume_of((72, 72, 72))
    write_ome_input(tmp_path, volume, zarr_format)
    run_smooth(
        tmp_path,
        {"type": "address", "address": cluster_address},
        {"dataset": "pred"},
        input_dataset="raw/s1",
    )
    s1 = zarr.open_array(str(tmp_path / "in.zarr" / "raw" / "s1"))[:]
    assert s1.shape == (36, 36, 36)
    image = tmp_path / "out.zarr" / "pred"
    got = read_output(image)
    # the output voxel size is s1's, and its translation s1's (1 nm, off s1's 4 nm grid)
    # plus one voxel of context: the predictions stay where their input voxels are
    assert ome_levels(image)[0][:2] == ([1.0, 4.0, 4.0, 4.0], [0.0, 5.0, 5.0, 5.0])
    assert zarr.open_array(str(image / "s0")).attrs["offset"] == [4, 4, 4]  # funlib's grid
    x = torch.from_numpy(s1.astype(np.float32) / 255)[None, None]
    expected = torch.nn.functional.avg_pool3d(x, 3, stride=1)[0].numpy()
    assert got.shape == (1, 34, 34, 34)
    assert max_abs_diff(got, expected) <= 1e-5
    assert zarr.open_array(str(image / "s0")).metadata.zarr_format == zarr_format


# --- bad input: one line, exit code 2, nothing written ----------------------------
# The base project's U-Net writes 4^3 per block (see test_bad_input.py).


def misaligned_shard(p: Project):
    p.workflow["output"]["shard_shape"] = [3, 3, 3]
    return ["shard shape (3, 3, 3) does not tile the write shape (4, 4, 4)", "output.shard_shape"]


def chunk_not_dividing_shard(p: Project):
    p.workflow["output"].update(zarr_format=3, chunk_shape=[3, 4, 4])
    return ["chunk shape (3, 4, 4) does not divide the shard shape (4, 4, 4)"]


def overlapping_groups(p: Project):
    p.workflow["model"]["head"]["out_channels"] = 3
    p.workflow["output"]["datasets"] = {"a": {"channels": [0, 2]}, "b": {"channels": [1, 3]}}
    return ["channel groups 'a' and 'b' overlap", "output.datasets.b"]


def out_of_range_group(p: Project):
    p.workflow["output"]["datasets"] = {"a": {"channels": [0, 2]}}
    return ["channels [0, 2) exceed the model's 1 output channels", "output.datasets.a"]


def multiscale_not_dividing(p: Project):
    p.workflow["output"]["multiscale"] = 3
    return ["multiscale factor (8, 8, 8) of level s3 does not divide the write shape (4, 4, 4)"]


def missing_ome_level(p: Project):
    write_ome_input(p.root, volume_of((40, 40, 40)), 3)
    p.workflow["input"] = {"container": "in.zarr", "dataset": "raw/s7"}
    return ["OME-NGFF level 's7' does not exist", "raw/s0, raw/s1, raw/s2"]


def ome_image_instead_of_level(p: Project):
    write_ome_input(p.root, volume_of((40, 40, 40)), 2)
    p.workflow["input"] = {"container": "in.zarr", "dataset": "raw"}
    return ["is an OME-NGFF multiscale image, not an array", "raw/s0, raw/s1, raw/s2"]


@pytest.mark.parametrize(
    "case",
    [
        ome_image_instead_of_level,
        misaligned_shard,
        chunk_not_dividing_shard,
        overlapping_groups,
        out_of_range_group,
        multiscale_not_dividing,
        missing_ome_level,
    ],
    ids=lambda c: c.__name__,
)
def test_bad_output_layouts_are_rejected(tmp_path, case):
    project = Project(tmp_path)
    if case is overlapping_groups:  # a 3-channel head needs its own checkpoint
        from test_bad_input import UNET, save_checkpoint

        save_checkpoint(tmp_path / "model.pt", UNET, {"out_channels": 3})
    phrases = case(project)
    assert_rejected(project.predict(), project, *phrases)


def test_plan_prints_the_ome_level_and_the_output_layout(tmp_path):
    project = Project(tmp_path)
    write_ome_input(tmp_path, volume_of((40, 40, 40)), 3)
    project.workflow["input"] = {"container": "in.zarr", "dataset": "raw/s1"}
    project.workflow["output"].update(multiscale=1, chunk_shape=[2, 2, 2])
    result = project.plan()
    assert result.returncode == 0, result.stderr
    assert (
        "s1 of OME-NGFF image raw at voxel size (4, 4, 4) offset (0, 0, 0)"
        " (+(1.0, 1.0, 1.0), kept in the output's translation)" in result.stdout
    )
    assert "zarr v3, OME-NGFF 0.5" in result.stdout
    assert "output array pred/s0" in result.stdout and "shards (1, 4, 4, 4)" in result.stdout
    assert "output array pred/s1" in result.stdout
    assert not project.output.exists()


def test_roi_offset_outside_zero_keeps_translation(tmp_path, cluster_address):
    """Anisotropic voxels and a shifted input: translation is the output ROI's offset."""
    run_smooth(
        tmp_path,
        {"type": "address", "address": cluster_address},
        {"dataset": "pred", "zarr_format": 2},
        shape=(18, 34, 34),
        voxel_size=(40, 4, 4),
        offset=(400, -8, 12),
    )
    levels = ome_levels(tmp_path / "out.zarr" / "pred")
    roi = Roi((440, -4, 16), (16 * 40, 32 * 4, 32 * 4))
    assert levels == [([1.0, 40.0, 4.0, 4.0], [0.0, *map(float, roi.offset)], (1, 16, 32, 32))]


def test_output_grid_defaults():
    from blockpredict.output_grid import output_grid

    write = Coordinate(16, 16, 8)
    v2 = output_grid(write, None, None, sharded=False)
    assert v2.chunks == write and v2.shards is None and v2.factors == (Coordinate(1, 1, 1),)
    v3 = output_grid(write, None, None, sharded=True)
    assert v3.chunks == write and v3.shards is None  # one chunk per shard: no sharding codec
    inner = output_grid(write, [8, 8, 4], None, sharded=True, levels=2, factor=[2, 2, 1])
    assert inner.shards == write and inner.chunks == Coordinate(8, 8, 4)
    assert inner.factors[-1] == Coordinate(4, 4, 1)
    v2_small = output_grid(write, [8, 8, 8], None, sharded=False)
    assert v2_small.chunks == Coordinate(8, 8, 8)  # several chunks per block, none shared
