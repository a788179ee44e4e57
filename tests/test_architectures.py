"""Tests for the U-Net and the wrapper of plain, TorchScript and exported modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from funlib.geometry import Coordinate

from blockpredict.architectures import UNet, WrappedArchitecture, load_exported, load_torchscript
from blockpredict.errors import ModelError
from blockpredict.model import Model


def _unet2d(**kwargs: object) -> UNet:
    args: dict[str, object] = dict(
        input_shape=(44, 44),
        fmaps_in=1,
        num_fmaps=4,
        fmap_inc_factor=2,
        downsample_factors=[(2, 2), (2, 2)],
    )
    args.update(kwargs)
    return UNet(**args)  # type: ignore[arg-type]


def test_unet_2d_valid_shape_by_hand() -> None:
    # 44 -conv-conv-> 40 -pool-> 20 -> 16 -> 8 -> 4 (bottom)
    # -up-> 8 -> 4 -up-> 8 -> 4
    model = Model(_unet2d(fmaps_out=3), torch.nn.Identity())
    assert model.output_shape == Coordinate((4, 4))
    assert model.num_out_channels == 3
    assert model.architecture.downsample_factor_product == Coordinate((4, 4))
    assert model.compute_output_shape(Coordinate((48, 52)))[1] == Coordinate((8, 12))


def test_unet_defaults() -> None:
    unet = _unet2d()
    assert unet.num_in_channels == 1 and unet.num_out_channels == 4
    assert unet.eval_shape_increase == Coordinate((0, 0))
    assert unet.dims == 2
    assert unet.scale(Coordinate((3, 3))) == Coordinate((3, 3))


def test_unet_3d_valid_shape() -> None:
    unet = UNet((20, 20, 20), 2, 3, 2, [(2, 2, 2)], fmaps_out=5, eval_shape_increase=(4, 4, 4))
    model = Model(unet, torch.nn.Identity())
    assert model.output_shape == Coordinate((4, 4, 4))
    assert model.num_out_channels == 5
    assert model.eval_input_shape == Coordinate((24, 24, 24))
    assert model.compute_output_shape(model.eval_input_shape)[1] == Coordinate((8, 8, 8))


def test_unet_same_padding_keeps_shape() -> None:
    unet = UNet((8, 16, 16), 1, 2, 2, [(2, 2, 2), (2, 2, 2)], padding="same", batch_norm=True)
    assert Model(unet, torch.nn.Identity()).output_shape == Coordinate((8, 16, 16))


def test_unet_anisotropic() -> None:
    k = [(1, 3, 3), (1, 3, 3)]
    unet = UNet(
        (5, 44, 44),
        1,
        2,
        2,
        [(1, 2, 2), (1, 2, 2)],
        kernel_size_down=[k, k, k],
        kernel_size_up=[k, k],
    )
    assert Model(unet, torch.nn.Identity()).output_shape == Coordinate((5, 4, 4))
    assert unet.downsample_factor_product == Coordinate((1, 4, 4))


def test_unet_upsample_factors() -> None:
    unet = UNet((16, 16), 1, 2, 2, [(2, 2)], padding="same", upsample_factors=[(2, 2)])
    assert Model(unet, torch.nn.Identity()).output_shape == Coordinate((32, 32))
    assert unet.scale(Coordinate((8, 4))) == Coordinate((4, 2))
    with pytest.raises(ModelError, match="not divisible"):
        unet.scale(Coordinate((8, 3)))

    # valid: 44 -> 4 (as above) -up-> 8 -conv-conv-> 4; 64 -> 24 -up-> 48 -> 44
    valid = Model(_unet2d(upsample_factors=[(2, 2)]), torch.nn.Identity())
    assert valid.output_shape == Coordinate((4, 4))
    assert valid.compute_output_shape(Coordinate((64, 64)))[1] == Coordinate((44, 44))


def test_unet_rejects_indivisible_input_and_bad_config() -> None:
    with pytest.raises(ModelError, match="downsample"):
        Model(_unet2d(input_shape=(46, 46)), torch.nn.Identity())
    with pytest.raises(ModelError):
        _unet2d(padding="reflect")
    with pytest.raises(ModelError):
        _unet2d(kernel_size_up=[[(3, 3)]])
    with pytest.raises(ModelError):
        _unet2d(activation="NoSuchActivation")


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_tiles_equal_whole(dims: int) -> None:
    """Tiles at offsets that are multiples of the downsample product reproduce one big pass."""
    torch.manual_seed(0)
    if dims == 2:
        unet = _unet2d(batch_norm=True)
        tile, big, context = (44, 44), (56, 60), 40
        offsets = [(0, 0), (4, 8), (12, 16)]
    else:
        unet = UNet((20, 20, 20), 1, 2, 2, [(2, 2, 2)], batch_norm=True)
        tile, big, context = (20, 20, 20), (24, 26, 24), 16
        offsets = [(0, 0, 0), (2, 6, 4), (4, 2, 0)]
    model = Model(unet, torch.nn.Identity()).eval()
    x = torch.randn((1, 1) + big)
    with torch.no_grad():
        whole = model(x)
        for offset in offsets:
            crop = tuple(slice(o, o + t) for o, t in zip(offset, tile))
            out = model(x[(slice(None), slice(None)) + crop])
            expected = whole[
                (slice(None), slice(None))
                + tuple(slice(o, o + t - context) for o, t in zip(offset, tile))
            ]
            assert out.shape == expected.shape
            assert torch.allclose(out, expected, atol=1e-5)


def _conv() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Conv3d(2, 3, 3).eval()


def test_wrapped_plain_module() -> None:
    conv = _conv()
    arch = WrappedArchitecture(
        conv, (8, 8, 8), 2, 3, eval_shape_increase=(4, 4, 4), scale=(1, 2, 2)
    )
    model = Model(arch, torch.nn.Identity()).eval()
    assert model.output_shape == Coordinate((6, 6, 6))
    assert model.eval_input_shape == Coordinate((12, 12, 12))
    assert model.scale(Coordinate((4, 4, 4))) == Coordinate((4, 2, 2))
    with pytest.raises(ModelError, match="not divisible"):
        model.scale(Coordinate((4, 3, 4)))
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), conv(x))


def test_wrapped_defaults() -> None:
    arch = WrappedArchitecture(_conv(), (8, 8, 8), 2, 3)
    assert arch.eval_shape_increase == Coordinate((0, 0, 0))
    assert arch.scale(Coordinate((3, 5, 7))) == Coordinate((3, 5, 7))
    with pytest.raises(ModelError):
        WrappedArchitecture(_conv(), (8, 8, 8), 2, 3, scale=(2, 2))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* is deprecated
def test_wrapped_torchscript(tmp_path: Path) -> None:
    conv = _conv()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(conv), str(path))
    module = load_torchscript(path)
    model = Model(WrappedArchitecture(module, (8, 8, 8), 2, 3), torch.nn.Identity()).eval()
    assert model.output_shape == Coordinate((6, 6, 6))
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), conv(x), atol=1e-6)


def test_wrapped_exported(tmp_path: Path) -> None:
    conv = _conv()
    x = torch.randn(1, 2, 8, 8, 8)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(conv, (x,)), str(path))
    module = load_exported(path)
    arch = WrappedArchitecture(module, (8, 8, 8), 2, 3)
    model = Model(arch, torch.nn.Identity(), eval_activation=torch.nn.Sigmoid())
    model.eval().to("cpu")  # exported modules refuse .eval() on their own
    model.train()
    model.eval()
    assert not model.training and not arch.training
    assert model.output_shape == Coordinate((6, 6, 6))
    with torch.no_grad():
        assert torch.allclose(model(x), torch.sigmoid(conv(x)), atol=1e-6)


def test_loaders_missing_and_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    for load in (load_torchscript, load_exported):
        with pytest.raises(ModelError, match="missing.pt"):
            load(missing)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a model")
    for load in (load_torchscript, load_exported):
        with pytest.raises(ModelError, match="junk.pt2"):
            load(junk)


SLIM_K = [[1, 3, 3], [1, 3, 3]]
SLIM_CASES = [
    {
        "input_shape": [108, 108, 108],
        "num_fmaps": 12,
        "fmap_inc_factor": 3,
        "downsample_factors": [[2, 2, 2]],
    },
    {
        "input_shape": [5, 44, 44],
        "num_fmaps": 4,
        "downsample_factors": [[1, 2, 2], [1, 2, 2]],
        "kernel_size_down": [SLIM_K] * 3,
        "kernel_size_up": [SLIM_K] * 2,
        "fmaps_out": 5,
    },
    {
        "input_shape": [64, 64],
        "num_fmaps": 4,
        "downsample_factors": [[2, 2]],
        "padding": "same",
        "use_attention": True,
        "constant_upsample": False,
        "batch_norm": True,
    },
    {
        "input_shape": [44, 44],
        "num_fmaps": 4,
        "downsample_factors": [[2, 2]],
        "upsample_factors": [[2, 2]],
        "eval_shape_increase": [20, 20],
        "fmaps_in": 2,
    },
]


@pytest.mark.parametrize("unet", SLIM_CASES)
@pytest.mark.parametrize("kernel", [1, 3])
def test_a_built_unets_shapes_are_its_forwards(unet: dict, kernel: int) -> None:
    """``build_model`` finds a U-Net's output shapes with a slim twin (one feature map per
    level); the real model's forward gives the same channels and shapes."""
    from blockpredict.build import build_model
    from blockpredict.config import ModelConfig

    config = ModelConfig.model_validate(
        {"unet": unet, "head": {"out_channels": 3, "kernel_size": kernel}}
    )
    model = build_model(config)
    x = torch.zeros(1, model.num_in_channels, *model.input_shape)
    with torch.no_grad():
        y = model(x)
    assert model.num_out_channels == y.shape[1] == 3
    assert model.output_shape == Coordinate(y.shape[2:])
    with torch.no_grad():  # and at the eval shape, which the plan uses
        y = model(torch.zeros(1, model.num_in_channels, *model.eval_input_shape))
    assert model.eval_output_shape == Coordinate(y.shape[2:])
