"""The workflow schema: what a user writes in YAML (or passes from Python).

Unknown keys are errors with a "did you mean" hint; relative paths are
resolved against the workflow file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from .config_errors import README_WORKFLOW, config_error
from .errors import ConfigError
from .unet_config import UNetConfig, read_unet_config
from .urls import READ_ONLY_SCHEMES, check_url, is_url, local_path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=Strict)


class Scaling(Strict):
    """Explicit normalization: ``value * scale + shift``."""

    scale: float
    shift: float = 0.0


def _container(value: Any) -> Any:
    """A URL stays a (checked) string, ``file://`` becomes its path, the rest a Path."""
    if isinstance(value, str) and "://" in value:
        check_url(value)
        return local_path(value) if value.lower().startswith("file://") else value
    return Path(value) if isinstance(value, str) else value


# a local path (resolved against the workflow's folder) or an fsspec URL (never resolved)
Container = Annotated[Path | str, BeforeValidator(_container)]


def resolve_container(container: Path | str, base: Path) -> Path | str:
    """A relative path made absolute against ``base``; URLs and absolute paths as they are."""
    if is_url(container) or Path(container).is_absolute():
        return container
    return (base / container).resolve()


class InputConfig(Strict):
    container: Container
    dataset: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    chunk_cache_mib: NonNegativeInt = 256  # per worker, for URL containers; 0: no cache
    normalize: Literal["auto", "none"] | Scaling = "auto"
    voxel_size: list[PositiveInt] | None = None  # overrides the input's metadata
    offset: list[int] | None = None  # world units; overrides the input's metadata


class HeadConfig(Strict):
    out_channels: PositiveInt | None = None  # None: from the checkpoint's prediction_head.weight
    kernel_size: PositiveInt = 1


class ModelConfig(Strict):
    """One of ``unet``, ``torchscript``, ``exported`` or ``factory``."""

    unet: UNetConfig | None = None
    head: HeadConfig | None = None
    torchscript: Path | None = None
    exported: Path | None = None
    factory: str | None = None
    python_path: list[Path] = Field(default_factory=list)  # importable on client and workers
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None
    input_shape: list[PositiveInt] | None = None
    eval_shape_increase: list[NonNegativeInt] | None = None
    num_in_channels: PositiveInt | None = None
    num_out_channels: PositiveInt | None = None
    scale: int | list[int] = 1
    eval_activation: Literal["sigmoid", "softmax", "tanh"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = [k for k in ("unet", "torchscript", "exported", "factory") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of unet, torchscript, exported, factory"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        if self.unet is not None and self.head is None and self.checkpoint is None:
            raise ValueError(
                "unet needs a head: {out_channels, kernel_size} (or a checkpoint holding "
                "prediction_head.weight)"
            )
        if self.head is not None and self.unet is None:
            raise ValueError("head is only for unet; build the head into the model file")
        declared = (
            [
                k
                for k in (
                    "input_shape",
                    "eval_shape_increase",
                    "num_in_channels",
                    "num_out_channels",
                )
                if getattr(self, k) is not None
            ]
            + (["scale"] if self.scale != 1 else [])
            + (["kwargs"] if self.kwargs else [])
        )
        if self.unet is not None and declared:
            raise ValueError(f"{', '.join(declared)} belong in the unet section, not beside it")
        if self.factory is None and self.kwargs:
            raise ValueError("kwargs are for factory")
        if self.torchscript or self.exported:
            missing = [
                k
                for k in ("input_shape", "num_in_channels", "num_out_channels")
                if getattr(self, k) is None
            ]
            if missing:
                raise ValueError(f"declare {', '.join(missing)} for a torchscript/exported model")
        return self


class RoiConfig(Strict):
    """A region in world units."""

    offset: list[int]
    shape: list[PositiveInt]

    @model_validator(mode="after")
    def _same_dims(self) -> RoiConfig:
        if len(self.offset) != len(self.shape):
            raise ValueError(f"offset has {len(self.offset)} values, shape has {len(self.shape)}")
        return self


OutputDtype = Literal["float32", "float16", "uint8"]


class ChannelGroup(Strict):
    """Channels ``[lo, hi)`` of the model's output, written as one array."""

    channels: tuple[NonNegativeInt, NonNegativeInt]
    dtype: OutputDtype = "float32"

    @model_validator(mode="after")
    def _order(self) -> ChannelGroup:
        lo, hi = self.channels
        if lo >= hi:
            raise ValueError(f"channels [{lo}, {hi}) is empty: give [lo, hi) with lo < hi")
        return self


class OutputConfig(Strict):
    container: Container
    dataset: str = "predictions"
    roi: RoiConfig | None = None
    dtype: OutputDtype = "float32"
    border: Literal["valid", "pad"] = "valid"
    overwrite: bool = False
    # storage layout (see README "Output layout"); None means "derive it"
    zarr_format: Literal[2, 3] | None = None
    chunk_shape: list[PositiveInt] | None = None
    shard_shape: list[PositiveInt] | None = None
    compressor: Literal["lz4", "zstd", "gzip", "none"] = "lz4"
    multiscale: NonNegativeInt = 0
    multiscale_factors: list[PositiveInt] | None = None
    range: tuple[float, float] = (0.0, 1.0)
    datasets: dict[str, ChannelGroup] | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _writable(self) -> OutputConfig:
        scheme = str(self.container).split("://", 1)[0].lower() if is_url(self.container) else ""
        if scheme in READ_ONLY_SCHEMES:
            raise ValueError(f"{scheme}:// is read-only; write the output to s3://, gs://, a path")
        return self

    @model_validator(mode="after")
    def _layout(self) -> OutputConfig:
        if self.shard_shape is not None and self.zarr_format == 2:
            raise ValueError("shard_shape needs zarr_format: 3 (zarr v2 has no shards)")
        if self.range[0] == self.range[1]:
            raise ValueError(f"range {list(self.range)} is empty: give [lo, hi] with lo != hi")
        if self.datasets is not None and not self.datasets:
            raise ValueError("datasets is empty: name at least one channel group")
        return self


class AdaptConfig(Strict):
    """Adaptive number of worker processes (batch clusters)."""

    minimum: NonNegativeInt = 0
    maximum: PositiveInt

    @model_validator(mode="after")
    def _order(self) -> AdaptConfig:
        if self.minimum > self.maximum:
            raise ValueError(f"minimum {self.minimum} exceeds maximum {self.maximum}")
        return self


BATCH_TYPES = ("slurm", "lsf", "pbs", "sge")


class ClusterConfig(Strict):
    type: Literal["local", "slurm", "lsf", "pbs", "sge", "address"] = "local"
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    address: str | None = None
    dashboard_address: str = "127.0.0.1:8787"
    jobqueue: dict[str, Any] = Field(default_factory=dict)
    adapt: AdaptConfig | None = None
    gpus_per_job: NonNegativeInt = 0
    tls: bool = True
    worker_timeout: float = Field(300.0, gt=0)
    worker_env: dict[str, StrictStr] = Field(default_factory=dict)  # adds to/overrides defaults

    @model_validator(mode="after")
    def _address(self) -> ClusterConfig:
        if self.type == "address" and not self.address:
            raise ValueError("cluster type 'address' needs address: tcp://host:port")
        batch_only = [k for k in ("jobqueue", "adapt", "gpus_per_job") if getattr(self, k)]
        if self.type not in BATCH_TYPES and batch_only:
            raise ValueError(
                f"{', '.join(batch_only)} only apply to cluster types {', '.join(BATCH_TYPES)}"
            )
        return self

    @property
    def is_batch(self) -> bool:
        return self.type in BATCH_TYPES


class ExecutionConfig(Strict):
    max_retries: int = Field(2, ge=0)
    blocks_per_task: Literal["auto"] | PositiveInt = "auto"
    batch_size: int = Field(1, ge=1)
    io_threads: Literal["auto"] | PositiveInt = "auto"  # readers and writers per worker
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    compile: bool = False
    cuda_graphs: bool = False  # on CUDA: replay the forward as a captured graph (opt-in)
    fail_fast: int = Field(10, ge=0)
    resume: bool = True
    grace_period: float = Field(30.0, ge=0)
    block_timeout: float | None = Field(None, gt=0)
    progress_interval: float = Field(60.0, gt=0)  # seconds between progress lines (no TTY)
    dashboard_linger: float = Field(0.0, ge=0)  # seconds the page stays up after the run


class Workflow(Strict):
    input: InputConfig
    model: ModelConfig
    output: OutputConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    def resolved(self, base: Path) -> Workflow:
        """A copy with relative paths made absolute against ``base``."""

        def fix(p: Any) -> Any:
            return None if p is None else resolve_container(p, base)

        model = self.model.model_copy(
            update={
                **{
                    k: fix(getattr(self.model, k))
                    for k in ("torchscript", "exported", "checkpoint")
                },
                # a factory module beside the workflow imports on the client and the workers
                "python_path": [fix(p) for p in self.model.python_path] + [base.resolve()],
            }
        )
        return self.model_copy(
            update={
                "input": self.input.model_copy(update={"container": fix(self.input.container)}),
                "output": self.output.model_copy(update={"container": fix(self.output.container)}),
                "model": model,
            }
        )


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> Workflow:
    """Read, override (``key.sub=value``), validate and resolve a workflow file."""
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("workflow file not found", where, "check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{where}:{mark.line + 1}" if mark else where
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"malformed YAML: {problem}", line, "fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError("workflow must be a mapping", where, README_WORKFLOW)
    for item in overrides or []:
        apply_override(raw, item)
    workflow = validate_workflow(raw, where, path.resolve().parent)
    return workflow.resolved(path.resolve().parent)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set a dotted key from ``key.sub=value``; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"bad --set {item!r}", "command line", "write --set key.sub=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a mapping", "command line")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"malformed --set value for {key}: {problem}", "command line", "write it as YAML"
        ) from None


def validate_workflow(
    raw: dict[str, Any], where: str = "workflow", base: Path | None = None
) -> Workflow:
    """Validate a raw mapping; the first problem becomes one clear :class:`ConfigError`.

    A ``model.unet`` that is a path (relative to ``base``) is read here.
    """
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("unet"), (str, Path)):
        file = Path(model["unet"])
        file = file if file.is_absolute() else (base or Path.cwd()) / file
        raw = {**raw, "model": {**model, "unet": read_unet_config(file)}}
    try:
        return Workflow.model_validate(raw)
    except ValidationError as e:
        raise config_error(e, Workflow, where) from None


def validate_section(kind: type[S], raw: Any, section: str) -> S:
    """One section given from Python (a mapping or the model itself)."""
    if isinstance(raw, kind):
        return raw
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        raise config_error(e, Workflow, section, (section,)) from None
