"""The ``model.unet`` section: the keys of DaCapo's ``CNNectomeUNetConfig``.

Given inline in the workflow, or as the path of the YAML/JSON file DaCapo's
config store writes (``<config root>/architectures/<name>.yaml``: a
``__type__``, a ``name``, ``_eval_shape_increase`` with its underscore, and
coordinates as ``!!python/tuple``).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from .errors import ConfigError

SUPPORTED_TYPES = ("CNNectomeUNetConfig",)


class UNetConfig(BaseModel):
    """DaCapo's ``CNNectomeUNetConfig`` keys, defaults and meanings.

    DaCapo requires ``fmaps_out``, ``fmaps_in``, ``num_fmaps``,
    ``fmap_inc_factor`` and ``downsample_factors``; here they default to
    ``num_fmaps``, 1, 12, 2 and ``[]`` (a DaCapo file always has them).
    ``activation_on_upsample`` and ``upsample_channel_contraction`` are ours:
    left out, they are what DaCapo uses; a funlib.learn.torch ``UNet`` with its
    defaults needs ``false`` for both.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: list[PositiveInt]
    fmaps_out: PositiveInt | None = None
    fmaps_in: PositiveInt = 1
    num_fmaps: PositiveInt = 12
    fmap_inc_factor: PositiveInt = 2
    downsample_factors: list[list[PositiveInt]] = Field(default_factory=list)
    kernel_size_down: list[list[list[PositiveInt]]] | None = None
    kernel_size_up: list[list[list[PositiveInt]]] | None = None
    eval_shape_increase: list[NonNegativeInt] | None = None
    upsample_factors: list[list[PositiveInt]] | None = None
    constant_upsample: bool = True
    padding: Literal["valid", "same"] = "valid"
    use_attention: bool = False
    batch_norm: bool = False
    activation_on_upsample: bool = True
    upsample_channel_contraction: bool | list[bool] | None = None

    @model_validator(mode="before")
    @classmethod
    def _dacapo_keys(cls, data: Any) -> Any:
        """Accept ``_eval_shape_increase``, ``name`` and ``__type__`` as DaCapo writes them."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data.pop("name", None)
        kind = data.pop("__type__", None)
        if kind is not None and kind not in SUPPORTED_TYPES:
            raise ValueError(f"unknown __type__ {kind!r}; supported: {', '.join(SUPPORTED_TYPES)}")
        if "_eval_shape_increase" in data:
            if "eval_shape_increase" in data:
                raise ValueError("give eval_shape_increase or _eval_shape_increase, not both")
            data["eval_shape_increase"] = data.pop("_eval_shape_increase")
        return data

    @model_validator(mode="after")
    def _dims(self) -> UNetConfig:
        dims = len(self.input_shape)
        if dims not in (2, 3):
            raise ValueError(f"input_shape {self.input_shape} is neither 2D nor 3D")
        for key in ("downsample_factors", "upsample_factors"):
            for factor in getattr(self, key) or []:
                if len(factor) != dims:
                    raise ValueError(f"{key} entry {factor} does not have {dims} values")
        levels = len(self.downsample_factors) + 1
        for key, count in (("kernel_size_down", levels), ("kernel_size_up", levels - 1)):
            value = getattr(self, key)
            if value is not None and len(value) != count:
                raise ValueError(f"{key} needs {count} lists of kernel sizes (one per level)")
        if self.upsample_factors and levels == 1 and self.kernel_size_up is None:
            raise ValueError("upsample_factors need kernel_size_up (or downsample_factors)")
        return self


class _DaCapoLoader(yaml.SafeLoader):
    """Safe YAML that reads ``!!python/tuple`` (DaCapo dumps coordinates as tuples) as lists."""


_DaCapoLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: loader.construct_sequence(node, deep=True),  # type: ignore[arg-type]
)


def read_unet_config(path: Path) -> UNetConfig:
    """Read and validate an architecture config file; one :class:`ConfigError` on failure."""
    where = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            "architecture config file not found",
            where,
            "check model.unet (a path is relative to the workflow file)",
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"cannot read architecture config file ({type(e).__name__})",
            where,
            "give a readable YAML or JSON file",
        ) from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.load(text, _DaCapoLoader)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"malformed architecture config: {str(e).splitlines()[0]}", where, "fix the syntax"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"architecture config must be a mapping, got {type(raw).__name__}",
            where,
            "write the keys of CNNectomeUNetConfig (input_shape, fmaps_in, ...)",
        )
    try:
        return UNetConfig.model_validate(raw)
    except ValidationError as e:
        raise unet_config_error(e, where) from None


def unet_config_error(error: ValidationError, where: str) -> ConfigError:
    """The first problem of a config file as one line, with a did-you-mean for unknown keys."""
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "unet"
    if first["type"] == "extra_forbid" or first["type"] == "extra_forbidden":
        known = [*UNetConfig.model_fields, "_eval_shape_increase", "name", "__type__"]
        close = difflib.get_close_matches(str(first["loc"][0]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return ConfigError(f"unknown key {key!r}", where, hint)
    if first["type"] == "missing":
        return ConfigError(f"missing key {key!r}", where, "add it (see 'model' in the README)")
    message = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"invalid value for {key or 'unet'}: {message}", where, "fix the file")
