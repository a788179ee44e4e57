"""DaCapo's Model/Architecture API.

The engine only relies on this API (``input_shape``, ``eval_input_shape``,
``num_in_channels``, ``num_out_channels``, ``output_shape``,
``compute_output_shape`` and ``scale``), so a real DaCapo ``Model`` works
as well as the classes here. The implementation mirrors
``dacapo/experiments/model.py`` and ``.../architectures/architecture.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from funlib.geometry import Coordinate


class Architecture(torch.nn.Module, ABC):
    """A network body with a declared spatial input shape and channel counts.

    Subclasses implement ``input_shape``, ``num_in_channels`` and
    ``num_out_channels``; ``eval_shape_increase`` and ``scale`` are optional.
    """

    @property
    @abstractmethod
    def input_shape(self) -> Coordinate:
        """Spatial input shape (no batch or channel axes) used in training."""

    @property
    def eval_shape_increase(self) -> Coordinate:
        """How much larger the input may be at prediction time (zeros by default)."""
        return Coordinate((0,) * self.input_shape.dims)

    @property
    @abstractmethod
    def num_in_channels(self) -> int:
        """Number of input channels the architecture expects."""

    @property
    @abstractmethod
    def num_out_channels(self) -> int:
        """Number of output channels the architecture produces."""

    @property
    def dims(self) -> int:
        """Number of spatial dimensions."""
        return self.input_shape.dims

    def scale(self, input_voxel_size: Coordinate) -> Coordinate:
        """Output voxel size for a given input voxel size (identity by default)."""
        return input_voxel_size


class Model(torch.nn.Module):
    """An ``Architecture`` followed by a prediction head.

    ``eval_activation`` (e.g. a sigmoid) runs only in eval mode, so training
    can use logits-based losses while prediction yields probabilities.

    Unlike DaCapo, the constructor does not re-initialise conv weights
    (DaCapo applies Kaiming init here, which would wipe pretrained weights of
    a wrapped model), and the shape probe leaves buffers such as BatchNorm
    running statistics untouched. ``output_shape`` (channels and spatial shape at
    ``input_shape``), where the caller already knows it, skips that dummy forward: a
    worker rebuilding the client's model paid a whole forward for it (1.5 s for the
    bench's 108^3 U-Net on one core) before its first block. ``eval_output_shape``, the
    spatial output shape at ``eval_input_shape`` where the caller knows it, spares the
    plan another dummy forward at that (larger) shape.
    """

    num_out_channels: int
    num_in_channels: int

    def __init__(
        self,
        architecture: Architecture,
        prediction_head: torch.nn.Module,
        eval_activation: torch.nn.Module | None = None,
        *,
        output_shape: tuple[int, Coordinate] | None = None,
        eval_output_shape: Coordinate | None = None,
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.prediction_head = prediction_head
        self.chain = torch.nn.Sequential(architecture, prediction_head)
        self.num_in_channels = architecture.num_in_channels

        self.input_shape: Coordinate = Coordinate(architecture.input_shape)
        self.eval_input_shape: Coordinate = self.input_shape + architecture.eval_shape_increase
        if output_shape is None:  # DaCapo's way: a dummy forward
            output_shape = self.compute_output_shape(self.input_shape)
        self.num_out_channels, self.output_shape = int(output_shape[0]), Coordinate(output_shape[1])
        self.eval_output_shape = (
            None if eval_output_shape is None else Coordinate(eval_output_shape)
        )
        self.eval_activation = eval_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the chain; apply ``eval_activation`` only in eval mode."""
        result = self.chain(x)
        if not self.training and self.eval_activation is not None:
            result = self.eval_activation(result)
        return result

    def compute_output_shape(self, input_shape: Coordinate) -> tuple[int, Coordinate]:
        """Number of output channels and spatial output shape for ``input_shape``.

        Found by a dummy forward pass of zeros on the model's device.
        """
        assert isinstance(input_shape, Coordinate), (
            f"input_shape must be a Coordinate, got {type(input_shape).__name__}"
        )
        return self.__get_output_shape(input_shape, self.num_in_channels)

    def __get_output_shape(
        self, input_shape: Coordinate, in_channels: int
    ) -> tuple[int, Coordinate]:
        device = torch.device("cpu")
        for parameter in self.parameters():
            device = parameter.device
            break

        dummy_data = torch.zeros((1, in_channels) + tuple(input_shape), device=device)
        # A forward pass in training mode updates BatchNorm statistics; keep
        # them as they were so probing the shape never changes the model.
        saved = [buffer.clone() for buffer in self.buffers()]
        with torch.no_grad():
            out = self.forward(dummy_data)
            for buffer, value in zip(self.buffers(), saved, strict=True):
                buffer.copy_(value)
        return int(out.shape[1]), Coordinate(out.shape[2:])

    def scale(self, voxel_size: Coordinate) -> Coordinate:
        """Output voxel size for input ``voxel_size`` (delegates to the architecture)."""
        return self.architecture.scale(voxel_size)
