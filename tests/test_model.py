"""Tests for the DaCapo-style Model/Architecture API."""

from __future__ import annotations

import pytest
import torch
from funlib.geometry import Coordinate

from blockpredict.model import Architecture, Model


class TinyArch(Architecture):
    """Two valid 3x3 convs in 2D: output shrinks by 4 per axis."""

    def __init__(self, increase: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.increase = increase
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 5, 3)
        )

    @property
    def input_shape(self) -> Coordinate:
        return Coordinate((12, 10))

    @property
    def eval_shape_increase(self) -> Coordinate:
        return Coordinate(self.increase) if self.increase else super().eval_shape_increase

    @property
    def num_in_channels(self) -> int:
        return 2

    @property
    def num_out_channels(self) -> int:
        return 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_architecture_defaults() -> None:
    arch = TinyArch()
    assert arch.eval_shape_increase == Coordinate((0, 0))
    assert arch.dims == 2
    assert arch.scale(Coordinate((4, 8))) == Coordinate((4, 8))


def test_architecture_is_abstract() -> None:
    with pytest.raises(TypeError):
        Architecture()  # type: ignore[abstract]


def test_model_attributes() -> None:
    arch = TinyArch(increase=(8, 4))
    head = torch.nn.Conv2d(5, 3, 1)
    model = Model(arch, head)
    assert model.architecture is arch and model.prediction_head is head
    assert isinstance(model.chain, torch.nn.Sequential)
    assert list(model.chain) == [arch, head]
    assert model.num_in_channels == 2
    assert model.input_shape == Coordinate((12, 10))
    assert model.eval_input_shape == Coordinate((20, 14))
    assert model.num_out_channels == 3
    assert model.output_shape == Coordinate((8, 6))
    assert isinstance(model.output_shape, Coordinate)
    assert model.eval_activation is None
    assert model.scale(Coordinate((2, 2))) == Coordinate((2, 2))


def test_compute_output_shape() -> None:
    model = Model(TinyArch(), torch.nn.Identity())
    channels, shape = model.compute_output_shape(Coordinate((30, 20)))
    assert channels == 5 and isinstance(channels, int)
    assert shape == Coordinate((26, 16)) and isinstance(shape, Coordinate)
    with pytest.raises(AssertionError):
        model.compute_output_shape((30, 20))  # type: ignore[arg-type]


def test_a_known_output_shape_skips_the_dummy_forward() -> None:
    """A worker rebuilds the client's model with the shapes the client found: no forward
    runs while the model is built (it cost a whole forward before the first block)."""
    calls = []
    arch = TinyArch()
    arch.register_forward_hook(lambda *args: calls.append(1))
    model = Model(arch, torch.nn.Identity(), output_shape=(5, Coordinate((8, 6))))
    assert not calls
    assert model.num_out_channels == 5 and model.output_shape == Coordinate((8, 6))
    assert isinstance(model.output_shape, Coordinate)
    Model(arch, torch.nn.Identity())
    assert calls == [1]  # DaCapo's way, without it


def test_compute_output_shape_keeps_batchnorm_stats() -> None:
    arch = TinyArch()
    bn = arch.net[1]
    bn.running_mean.fill_(3.0)
    Model(arch, torch.nn.Identity())
    assert torch.all(bn.running_mean == 3.0)
    assert int(bn.num_batches_tracked) == 0


def test_eval_activation_only_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = Model(TinyArch(), torch.nn.Identity(), eval_activation=torch.nn.Sigmoid())
    x = torch.randn(1, 2, 12, 10)
    model.eval()
    with torch.no_grad():
        raw = model.chain(x)
        assert torch.allclose(model(x), torch.sigmoid(raw))
    model.train()
    with torch.no_grad():
        out = model(x)
    assert out.min() < 0 or out.max() > 1  # logits, not probabilities


def test_model_without_parameters_runs_on_cpu() -> None:
    class Identity(TinyArch):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    arch = Identity()
    del arch.net
    model = Model(arch, torch.nn.Identity())
    assert model.output_shape == Coordinate((12, 10))
    assert model.num_out_channels == 2
