"""Blockwise output equals the model applied to the whole volume in one pass.

Real LocalCluster worker processes, real zarr on disk, real torch models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import (
    UNET_3D,
    alive_checkpoint,
    enliven,
    make_input,
    max_abs_diff,
    python_lines,
    read_output,
    reference,
    volume_of,
    write_workflow,
)
from funlib.geometry import Coordinate, Roi
from funlib.persistence import open_ds, prepare_ds

import blockpredict
from blockpredict.architectures import CNNectomeUNet, UNet
from blockpredict.build import build_model
from blockpredict.config import ModelConfig, load_workflow
from blockpredict.errors import InputError
from blockpredict.preview import _read
from blockpredict.storage import BlockReader, open_input
from blockpredict.workflow import predict_workflow, prepare_workflow

TOLERANCE = 1e-4


def run_case(
    tmp_path: Path,
    address: str,
    data: np.ndarray,
    voxel_size: tuple[int, ...],
    model: dict[str, Any],
    output: dict[str, Any] | None = None,
    channels: bool = False,
    offset: tuple[int, ...] | None = None,
    normalize: Any = "auto",
    ref_model: torch.nn.Module | None = None,
):
    """Predict with a workflow; return (prediction, reference, plan). A U-Net without a
    checkpoint gets one whose outputs vary with the input (``alive_checkpoint``)."""
    model = alive_checkpoint(tmp_path, model)
    make_input(tmp_path / "in.zarr" / "raw", data, voxel_size, offset, channels)
    workflow = {
        "input": {"container": "in.zarr", "dataset": "raw", "normalize": normalize},
        "model": model,
        "output": {"container": "out.zarr", "dataset": "pred", **(output or {})},
        "cluster": {"type": "address", "address": address},
        "execution": {"max_retries": 0},
    }
    path = write_workflow(tmp_path / "workflow.yaml", workflow)
    loaded = load_workflow(path)
    plan = prepare_workflow(loaded).plan
    report = predict_workflow(loaded, progress=False)
    assert report.exit_code == 0, report.summary()
    assert report.blocks_processed == report.blocks_total == plan.num_blocks
    volume = data.astype(np.float32)
    if not channels:
        volume = volume[None]
    if normalize == "auto" and data.dtype == np.uint8:
        volume = volume / 255.0
    input_roi = Roi(
        Coordinate(offset or (0,) * len(voxel_size)),
        Coordinate(volume.shape[1:]) * Coordinate(voxel_size),
    )
    expected = reference(
        ref_model if ref_model is not None else build_model(loaded.model),
        volume,
        input_roi,
        Coordinate(voxel_size),
        plan,
    )
    return read_output(tmp_path / "out.zarr" / "pred"), expected, plan


@pytest.mark.parametrize(
    "unet",
    [
        UNET_3D,
        {**UNET_3D, "upsample_factors": [[2, 2, 2]]},
        {**UNET_3D, "input_shape": [28, 28], "downsample_factors": [[2, 2]]},
    ],
)
def test_the_test_unets_outputs_depend_on_their_input(unet):
    """Equivalence means something only if the model's output varies with its input:
    a misplaced block must not match by chance."""
    model = enliven(
        build_model(ModelConfig.model_validate({"unet": unet, "head": {"out_channels": 2}}))
    )
    volume = volume_of((40, 40, 40)).astype(np.float32) / 255
    dims = len(unet["input_shape"])
    blocks = [volume[(0,) * (3 - dims) + (slice(o, o + 28),) * dims] for o in (0, 12)]
    with torch.no_grad():
        a, b = (
            model(torch.from_numpy(np.ascontiguousarray(x))[None, None])[0].numpy() for x in blocks
        )
    assert a.std() > 0.01 and max_abs_diff(a, b) > 0.1


def test_3d_isotropic(tmp_path, cluster_address):
    got, expected, plan = run_case(
        tmp_path,
        cluster_address,
        volume_of((48, 48, 48)),
        (1, 1, 1),
        {"unet": UNET_3D, "head": {"out_channels": 2}},
    )
    assert plan.context == Coordinate(8, 8, 8)
    assert plan.output_roi == Roi((8, 8, 8), (32, 32, 32))
    assert plan.num_blocks == 27  # 12 + 12 + 8 along each axis: trailing blocks are partial
    assert got.shape == (2, 32, 32, 32)
    assert max_abs_diff(got, expected) <= TOLERANCE


def test_3d_anisotropic_with_checkpoint_and_offset(tmp_path, cluster_address):
    unet = {
        "input_shape": [12, 28, 28],
        "fmaps_in": 1,
        "num_fmaps": 3,
        "fmap_inc_factor": 2,
        "downsample_factors": [[1, 2, 2]],
        "kernel_size_down": [[[1, 3, 3], [1, 3, 3]], [[3, 3, 3], [3, 3, 3]]],
        "kernel_size_up": [[[1, 3, 3], [1, 3, 3]]],
    }
    model = {"unet": unet, "head": {"out_channels": 1}, "eval_activation": "sigmoid"}
    torch.manual_seed(123)  # weights unlike the default seed: the checkpoint must be used
    trained = CNNectomeUNet(
        input_shape=Coordinate(12, 28, 28),
        fmaps_out=3,
        fmaps_in=1,
        num_fmaps=3,
        fmap_inc_factor=2,
        downsample_factors=[(1, 2, 2)],
        kernel_size_down=unet["kernel_size_down"],
        kernel_size_up=unet["kernel_size_up"],
    )
    ref = blockpredict.Model(trained, torch.nn.Conv3d(3, 1, 1), torch.nn.Sigmoid())
    torch.save(ref.state_dict(), tmp_path / "weights.pt")
    got, expected, plan = run_case(
        tmp_path,
        cluster_address,
        volume_of((24, 50, 50)),
        (40, 8, 8),
        {**model, "checkpoint": "weights.pt"},
        offset=(400, 80, 80),
        ref_model=ref,
    )
    assert plan.output_voxel_size == Coordinate(40, 8, 8)
    assert plan.context == Coordinate(80, 64, 64)
    assert plan.output_roi.offset == Coordinate(480, 144, 144)
    assert max_abs_diff(got, expected) <= TOLERANCE


def test_upsampling_unet_halves_the_voxel_size(tmp_path, cluster_address):
    unet = {**UNET_3D, "upsample_factors": [[2, 2, 2]]}
    got, expected, plan = run_case(
        tmp_path,
        cluster_address,
        volume_of((40, 40, 40)),
        (8, 8, 8),
        {"unet": unet, "head": {"out_channels": 1}},
    )
    assert plan.output_voxel_size == Coordinate(4, 4, 4)
    import zarr

    attrs = zarr.open_array(str(tmp_path / "out.zarr" / "pred" / "s0"), mode="r").attrs
    assert attrs["voxel_size"] == [4, 4, 4]
    assert attrs["offset"] == list(plan.output_roi.offset)
    assert attrs["axis_names"] == ["c^", "z", "y", "x"]
    assert max_abs_diff(got, expected) <= TOLERANCE


def test_2d_model_on_a_3d_volume(tmp_path, cluster_address):
    unet = {**UNET_3D, "input_shape": [28, 28], "downsample_factors": [[2, 2]]}
    got, expected, plan = run_case(
        tmp_path,
        cluster_address,
        volume_of((5, 40, 40)),
        (1, 1, 1),
        {"unet": unet, "head": {"out_channels": 2}},
    )
    assert plan.read_shape == Coordinate(1, 28, 28)
    assert got.shape == (2, 5, 24, 24)
    assert max_abs_diff(got, expected) <= TOLERANCE


def test_border_pad_predicts_the_whole_input(tmp_path, cluster_address):
    got, expected, plan = run_case(
        tmp_path,
        cluster_address,
        volume_of((30, 30, 30)),
        (1, 1, 1),
        {"unet": UNET_3D, "head": {"out_channels": 1}},
        output={"border": "pad"},
    )
    assert plan.output_roi == Roi((0, 0, 0), (30, 30, 30))
    assert max_abs_diff(got, expected) <= TOLERANCE


def test_requested_roi_not_a_multiple_of_the_block(tmp_path, cluster_address):
    roi = {"offset": [10, 12, 9], "shape": [25, 17, 30]}
    got, expected, plan = run_case(
        tmp_path,
        cluster_address,
        volume_of((50, 50, 50)),
        (1, 1, 1),
        {"unet": UNET_3D, "head": {"out_channels": 1}},
        output={"roi": roi},
    )
    assert plan.output_roi == Roi((10, 12, 9), (25, 17, 30))
    assert got.shape == (1, 25, 17, 30)
    assert max_abs_diff(got, expected) <= TOLERANCE


def test_multichannel_float_input(tmp_path, cluster_address):
    data = np.stack([volume_of((36, 36, 36), s) for s in (1, 2)]).astype(np.float32) / 100
    got, expected, _ = run_case(
        tmp_path,
        cluster_address,
        data,
        (1, 1, 1),
        {"unet": {**UNET_3D, "fmaps_in": 2}, "head": {"out_channels": 1}},
        channels=True,
    )
    assert max_abs_diff(got, expected) <= TOLERANCE


def _channel_input(path: Path, data: np.ndarray, channel_axis: int) -> None:
    """``data`` (C, z, y, x) stored with its channel axis 'c^' at ``channel_axis``."""
    names = ["z", "y", "x"]
    names.insert(channel_axis, "c^")
    stored = np.moveaxis(data, 0, channel_axis)
    prepare_ds(
        str(path),
        shape=stored.shape,
        voxel_size=Coordinate(1, 1, 1),
        axis_names=names,
        types=["channel" if n == "c^" else "space" for n in names],
        dtype=stored.dtype,
        mode="w",
    )[:] = stored


def test_a_channel_axis_last_is_found_by_its_name(tmp_path, cluster_address):
    data = np.stack([volume_of((36, 36, 36), s) for s in (1, 2)]).astype(np.float32) / 100
    _channel_input(tmp_path / "in.zarr" / "raw", data, 3)
    workflow = {
        "input": {"container": "in.zarr", "dataset": "raw"},
        "model": {"unet": {**UNET_3D, "fmaps_in": 2}, "head": {"out_channels": 1}},
        "output": {"container": "out.zarr", "dataset": "pred"},
        "cluster": {"type": "address", "address": cluster_address},
        "execution": {"max_retries": 0},
    }
    loaded = load_workflow(write_workflow(tmp_path / "workflow.yaml", workflow))
    prepared = prepare_workflow(loaded)
    assert prepared.input.num_channels == 2 and prepared.input.axis_names == ("z", "y", "x")
    report = predict_workflow(loaded, progress=False)
    assert report.exit_code == 0, report.summary()
    roi = Roi((0, 0, 0), (36, 36, 36))
    expected = reference(build_model(loaded.model), data, roi, Coordinate(1, 1, 1), prepared.plan)
    assert max_abs_diff(read_output(tmp_path / "out.zarr" / "pred"), expected) <= TOLERANCE


def test_a_channel_axis_in_the_middle_reads_as_channels_first(tmp_path):
    data = np.stack([volume_of((12, 10, 8), s) for s in (1, 2, 3)])
    _channel_input(tmp_path / "mid.zarr", data, 1)
    info = open_input(tmp_path, "mid.zarr")
    assert (info.num_channels, info.channel_axis, info.axis_names) == (3, 1, ("z", "y", "x"))
    roi = Roi((-2, 3, 4), (6, 5, 6))  # partly outside: padded with zeros
    block = BlockReader(info, "none").read(roi)
    expected = np.zeros((3, 6, 5, 6), np.float32)
    expected[:, 2:, :, :4] = data[:, 0:4, 3:8, 4:8]
    np.testing.assert_array_equal(block, expected)
    assert _read(open_ds(str(tmp_path / "mid.zarr")), roi).shape == (3, 6, 5, 6)  # preview


def test_two_channel_axes_are_refused(tmp_path):
    prepare_ds(
        str(tmp_path / "two.zarr"),
        shape=(2, 3, 8, 8),
        voxel_size=Coordinate(1, 1),
        axis_names=["c^", "t^", "y", "x"],
        types=["channel", "channel", "space", "space"],
        dtype=np.uint8,
        mode="w",
    )
    with pytest.raises(InputError, match="2 channel axes \\('c\\^', 't\\^'\\)"):
        open_input(tmp_path, "two.zarr")


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_torchscript_and_exported_files(tmp_path, cluster_address, kind):
    torch.manual_seed(7)
    unet = UNet(
        input_shape=Coordinate(28, 28, 28),
        fmaps_in=1,
        num_fmaps=3,
        fmap_inc_factor=2,
        downsample_factors=[(2, 2, 2)],
    )
    module = torch.nn.Sequential(unet, torch.nn.Conv3d(3, 2, 1)).eval()
    example = torch.zeros(1, 1, 28, 28, 28)
    if kind == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(module, example), str(tmp_path / "model.pt"))
        source = {"torchscript": "model.pt"}
    else:
        torch.export.save(torch.export.export(module, (example,)), str(tmp_path / "model.pt2"))
        source = {"exported": "model.pt2"}
    declared = {"input_shape": [28, 28, 28], "num_in_channels": 1, "num_out_channels": 2}
    ref = blockpredict.Model(unet, torch.nn.Identity())
    ref.chain = module
    got, expected, _ = run_case(
        tmp_path,
        cluster_address,
        volume_of((44, 44, 44)),
        (1, 1, 1),
        {**source, **declared},
        ref_model=ref,
    )
    assert max_abs_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-3), ("uint8", 0.5)])
def test_output_dtypes(tmp_path, cluster_address, dtype, tolerance):
    got, expected, _ = run_case(
        tmp_path,
        cluster_address,
        volume_of((40, 40, 40)),
        (1, 1, 1),
        {"unet": UNET_3D, "head": {"out_channels": 1}, "eval_activation": "sigmoid"},
        output={"dtype": dtype},
    )
    assert got.dtype == np.dtype(dtype)
    if dtype == "uint8":
        expected = expected * 255
    assert max_abs_diff(got, expected) <= tolerance


@pytest.mark.parametrize("normalize", [{"scale": 0.01, "shift": -1.0}, "none"])
def test_zarr_v2_input_and_explicit_normalization(tmp_path, cluster_address, normalize):
    import zarr

    data = volume_of((40, 40, 40))
    array = zarr.create_array(
        str(tmp_path / "in.zarr" / "raw"),
        shape=data.shape,
        chunks=(16, 16, 16),
        dtype=data.dtype,
        zarr_format=2,
    )
    array[:] = data
    array.attrs.update(
        {"voxel_size": [2, 2, 2], "offset": [4, 4, 4], "axis_names": ["z", "y", "x"]}
    )
    workflow = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw", "normalize": normalize},
            "model": {"unet": UNET_3D, "head": {"out_channels": 1}},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"type": "address", "address": cluster_address},
        },
    )
    loaded = load_workflow(workflow)
    plan = prepare_workflow(loaded).plan
    assert predict_workflow(loaded, progress=False).exit_code == 0
    volume = data.astype(np.float32)[None]
    if normalize != "none":
        volume = volume * np.float32(0.01) - np.float32(1.0)
    expected = reference(
        build_model(loaded.model), volume, Roi((4, 4, 4), (80, 80, 80)), Coordinate(2, 2, 2), plan
    )
    got = read_output(tmp_path / "out.zarr" / "pred")
    assert plan.output_roi == Roi((20, 20, 20), (48, 48, 48))
    assert zarr.open_array(str(tmp_path / "out.zarr" / "pred" / "s0")).chunks == (1, 12, 12, 12)
    assert max_abs_diff(got, expected) <= TOLERANCE


def _stored(path: Path, shape: tuple[int, ...], attrs: dict[str, Any]) -> str:
    array = zarr.create_array(str(path), shape=shape, chunks=shape, dtype="uint8", overwrite=True)
    array.attrs.update(attrs)
    return str(path)


METADATA_CASES = {
    "no attributes": ((6, 7, 8), {}),
    "funlib's": (
        (6, 7, 8),
        {
            "voxel_size": [4, 2, 2],
            "offset": [8, 0, 2],
            "axis_names": ["z", "y", "x"],
            "units": ["nm", "nm", "nm"],
        },
    ),
    "a channel axis by name": ((2, 6, 7, 8), {"axis_names": ["c^", "z", "y", "x"]}),
    "a channel axis by type": (
        (6, 3, 7, 8),
        {"voxel_size": [2, 1, 1], "types": ["space", "channel", "space", "space"]},
    ),
    "2d": ((7, 8), {"voxel_size": [3, 5], "offset": [3, 10]}),
    "a voxel size without its axes": ((2, 6, 7), {"voxel_size": [4, 4]}),
}


@pytest.mark.parametrize("case", METADATA_CASES)
def test_the_input_metadata_is_what_funlib_reads(tmp_path, monkeypatch, case):
    """open_input reads funlib's metadata with funlib's parser but no dask array: the same
    axes, types, units, voxel size and ROI as funlib.persistence's open_ds."""
    from blockpredict import array_metadata
    from blockpredict.array_metadata import open_metadata

    # the parser loaded on its own, as in the command (funlib.persistence is imported here)
    monkeypatch.setattr(array_metadata, "FUNLIB_METADATA", "funlib.not.imported")
    shape, attrs = METADATA_CASES[case]
    path = _stored(tmp_path / "a.zarr", shape, attrs)
    ours, theirs = open_metadata(path), open_ds(path)
    assert (ours.axis_names, ours.types, ours.units) == (
        theirs.axis_names,
        theirs.types,
        theirs.units,
    )
    assert (ours.voxel_size, ours.roi, ours.shape) == (theirs.voxel_size, theirs.roi, theirs.shape)
    override = {"voxel_size": (9,) * ours.voxel_size.dims, "offset": (18,) * ours.voxel_size.dims}
    assert open_metadata(path, **override).roi == open_ds(path, **override).roi
    # where funlib's parser cannot be loaded alone (another layout), open_ds itself is used
    monkeypatch.setattr(array_metadata, "_parser", lambda: None)
    assert open_metadata(path) == ours


def test_a_mismatched_voxel_size_is_refused_as_funlib_refuses_it(tmp_path, monkeypatch):
    from blockpredict import array_metadata
    from blockpredict.array_metadata import open_metadata

    monkeypatch.setattr(array_metadata, "FUNLIB_METADATA", "funlib.not.imported")
    path = _stored(tmp_path / "a.zarr", (6, 7, 8), {"voxel_size": [1, 1], "units": ["nm"] * 3})
    with pytest.raises(Exception) as theirs:
        open_ds(path)
    with pytest.raises(type(theirs.value)):
        open_metadata(path)


def test_reading_the_inputs_metadata_imports_no_dask_array(tmp_path):
    """funlib.persistence's import brings dask.array, xarray and pandas (1.5 s of the
    client's start-up); the client reads the input without them."""
    make_input(tmp_path / "in.zarr" / "raw", volume_of((8, 8, 8)), (2, 2, 2), (4, 0, 0))
    code = (
        "import sys; from blockpredict.storage import open_input; "
        f"info = open_input({str(tmp_path / 'in.zarr')!r}, 'raw'); "
        "print(info.voxel_size, info.roi, 'dask.array' in sys.modules, 'xarray' in sys.modules)"
    )
    printed = " ".join(python_lines(code, tmp_path))
    assert printed.split() == [
        "(2,",
        "2,",
        "2)",
        "[4:20,",
        "0:16,",
        "0:16]",
        "(16,",
        "16,",
        "16)",
        "False",
        "False",
    ], printed
