"""A workflow from config to report: check everything, then plan, then run.

:func:`prepare` does every check that can fail on bad input (input, model,
checkpoint, channels, voxel sizes, ROI, existing output) before anything is
written; :func:`execute` then prepares the output and runs the blocks.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from .build import build_model, check_model_api, place
from .config import (
    ClusterConfig,
    ExecutionConfig,
    InputConfig,
    OutputConfig,
    Workflow,
    resolve_container,
    validate_section,
)
from .errors import ConfigError, GeometryError, ModelError, OutputError
from .events import events_path, replay
from .events import reset as reset_events
from .fingerprint import model_fingerprint
from .job import Job, describe
from .layout import describe_output
from .ledger import Ledger, ledger_path
from .lock import OutputLock
from .plan import BlockPlan, make_plan
from .precision import check_precision
from .report import RunReport
from .storage import (
    InputInfo,
    OutputInfo,
    check_output,
    normalization,
    open_input,
    output_path,
    prepare_output,
)
from .stores import check_container, exists, is_url

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A checked workflow: the input's metadata, the model's channels and the plan."""

    input: InputInfo
    output: OutputConfig
    plan: BlockPlan
    num_out_channels: int
    model: Any  # a ModelConfig for the workers to rebuild, or a Model object
    resume: bool = False  # an output and a ledger of this geometry exist: skip done blocks
    warnings: tuple[str, ...] = ()  # about the model, for plan to print
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what decides the values

    @property
    def output_path(self) -> str:
        return output_path(self.output.container, self.output.dataset)

    def output_info(self) -> OutputInfo:
        """The output's layout: images, levels, chunks, shards (checked at plan time)."""
        info = self.input
        return describe_output(
            self.plan, self.output, self.num_out_channels, info.axis_names, info.units,
            info.zarr_format,
        )

    def geometry(self) -> dict[str, Any]:
        """Everything that decides which voxels a block id reads and writes."""
        return {
            "plan": self.plan.to_dict(),
            "input": self.input.path,
            "output": self.output_path,
            "dtype": self.output.dtype,
            "num_out_channels": self.num_out_channels,
            "chunks": list(self.plan.write_shape),
            "layout": _layout_dict(self.output_info()),
            **self.fingerprint,
        }

    def output_nbytes(self) -> int:
        """Bytes of every array written (channel groups and pyramid levels), uncompressed."""
        return sum(
            np.dtype(image.dtype).itemsize * math.prod(level.shape)
            for image in self.output_info().images
            for level in image.levels
        )


def prepare(
    input: InputConfig,
    output: OutputConfig,
    model_source: Any,
    model: Any,
    execution: ExecutionConfig | None = None,
) -> Prepared:
    """Open the input, check the model against it and plan the blocks."""
    info = open_input(
        input.container, input.dataset, input.voxel_size, input.offset, input.storage_options
    )
    info = replace(info, cache_bytes=input.chunk_cache_mib << 20)
    scaling = normalization(info.dtype, input.normalize)
    out_path = output_path(output.container, output.dataset)
    check_not_input(info.path, out_path)
    check_writable(out_path)
    if info.num_channels != model.num_in_channels:
        raise ModelError(
            f"input has {info.num_channels} channels, the model expects {model.num_in_channels}",
            info.path,
            "use a matching input or model (a channel axis is named 'c^')",
        )
    eval_input_shape = Coordinate(model.eval_input_shape)
    if eval_input_shape.dims > info.voxel_size.dims:
        raise ModelError(
            f"model has {eval_input_shape.dims} spatial dims, the input has {info.voxel_size.dims}",
            info.path,
            "use a model with at most as many dims as the input",
        )
    try:
        channels, eval_output_shape = _output_shape(model, eval_input_shape)
    except Exception as e:
        raise ModelError(
            f"the model fails on an input of shape {tuple(eval_input_shape)}: {describe(e)}",
            "model",
            "check the declared input_shape and eval_shape_increase",
        ) from e
    model_dims = eval_input_shape.dims
    vin = info.voxel_size
    vout = Coordinate(model.scale(Coordinate(vin[vin.dims - model_dims :])))
    requested = None
    if output.roi is not None:
        if len(output.roi.offset) != vin.dims:
            raise GeometryError(
                f"output.roi has {len(output.roi.offset)} dims, the input has {vin.dims}",
                "output.roi",
                "give one offset and shape value per spatial axis (world units)",
            )
        requested = Roi(output.roi.offset, output.roi.shape)
    plan = make_plan(
        input_roi=info.roi,
        input_voxel_size=vin,
        output_voxel_size=vout,
        eval_input_shape=eval_input_shape,
        eval_output_shape=Coordinate(eval_output_shape),
        requested_roi=requested,
        border=output.border,
        phase=_phase(model),
    )
    for warning in plan.warnings:
        logger.warning(warning)
    warnings = _model_warnings(model)
    for warning in warnings:
        logger.warning(warning)
    _check_channels(model_source, int(channels))
    _warn_unbounded(model, output.dtype)
    fingerprint = model_fingerprint(model, model_source, scaling)
    prepared = Prepared(
        info,
        output,
        plan,
        int(channels),
        model_source,
        warnings=warnings,
        fingerprint=fingerprint,
    )
    prepared.output_info()  # shard, chunk, pyramid and channel-group errors before anything runs
    return _check_existing(prepared, execution or ExecutionConfig())


def check_not_input(input_path: str, out_path: str) -> None:
    """The input is only ever read: refuse an output or ledger that is, holds or lies in it.

    Local paths are compared resolved (``..``, symbolic links); URLs as written.
    """
    source = _resolved(input_path)
    for what, path in (("output", out_path), ("ledger", ledger_path(out_path))):
        target = _resolved(path)
        if target == source or _inside(target, source) or _inside(source, target):
            relation = "is"
            if target != source:
                relation = "contains" if _inside(source, target) else "lies inside"
            raise ConfigError(
                f"the {what} {relation} the input {input_path}",
                f"output.container/output.dataset {out_path}",
                "write the output to another dataset or container",
            )


def _resolved(path: str) -> str:
    return str(path).rstrip("/") if is_url(path) else os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/" + os.sep) + "/")


def check_writable(out_path: str) -> None:
    """The output's folder can be created and written (tried, then removed).

    A URL output is checked against its store instead (``stores.check_container``).
    """
    if is_url(out_path):
        return
    problem = writable_problem(os.path.dirname(os.path.abspath(out_path)))
    if problem:
        raise OutputError(
            f"the output cannot be written: {problem}",
            "output.container",
            "choose a writable location",
        )


def writable_problem(folder: str) -> str | None:
    """Why files cannot be made in ``folder`` (or the folders to create there), or None."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".blockpredict-check-", dir=existing))
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror or e})"
    return None


def _warn_unbounded(model: Any, dtype: str) -> None:
    """uint8 stores [0, 1] as 0..255: values of an unbounded activation are clipped."""
    activation = getattr(model, "eval_activation", None)
    name = type(activation).__name__ if activation is not None else "none"
    if dtype == "uint8" and name not in ("Sigmoid", "Softmax"):
        logger.warning(
            "output.dtype is uint8, which stores [0, 1] as 0..255, but the model's "
            "activation (%s) is not bounded to [0, 1]: values outside are clipped; "
            "set model.eval_activation: sigmoid or output.dtype: float32",
            name,
        )


def _check_channels(model_source: Any, channels: int) -> None:
    """A declared ``num_out_channels`` must be what the model's shape probe returned."""
    declared = getattr(model_source, "num_out_channels", None)
    if isinstance(declared, int) and declared != channels:
        raise ModelError(
            f"the model returns {channels} channel{'s' * (channels != 1)}, "
            f"the workflow declares {declared}",
            "model.num_out_channels",
            f"set num_out_channels: {channels} or fix the model",
        )


def _output_shape(model: Any, eval_input_shape: Coordinate) -> tuple[int, Coordinate]:
    """Channels and spatial output shape at the eval input shape.

    The Model computed its ``output_shape`` at ``input_shape`` when it was built
    (a dummy forward); reuse it where the eval shape is the same.
    """
    output_shape = getattr(model, "output_shape", None)
    if output_shape is not None and Coordinate(model.input_shape) == eval_input_shape:
        return int(model.num_out_channels), Coordinate(output_shape)
    channels, shape = model.compute_output_shape(eval_input_shape)
    return int(channels), Coordinate(shape)


def _check_existing(prepared: Prepared, execution: ExecutionConfig) -> Prepared:
    """Resume where a ledger of the same geometry exists; never clobber unasked."""
    out = prepared.output
    path = prepared.output_path
    options = out.storage_options
    if is_url(out.container):  # a missing bucket or denied credentials: before any block
        check_container(str(out.container), options, "output")
    names = [out.dataset, *(out.datasets or {})]
    if out.overwrite or not any(exists(output_path(out.container, n), options) for n in names):
        return prepared
    ledger = ledger_path(path)
    if execution.resume and Ledger.exists(ledger, options):
        Ledger.open(ledger, prepared.geometry(), options)  # raises when the geometry changed
        return replace(prepared, resume=True)
    for name in names:
        check_output(out.container, name, out.overwrite, options)
    return prepared


def _layout_dict(info: OutputInfo) -> dict[str, Any]:
    """What of the output layout decides the bytes a block writes (for the ledger's hash)."""
    return {
        "zarr_format": info.zarr_format,
        "range": list(info.range),
        "images": [
            {
                "path": image.path,
                "channels": list(image.channels),
                "dtype": image.dtype,
                "levels": [
                    [level.name, list(level.chunks), list(level.shards or [])]
                    for level in image.levels
                ],
            }
            for image in info.images
        ],
    }


def _model_warnings(model: Any) -> tuple[str, ...]:
    """What blockwise prediction cannot promise for this model."""
    architecture = getattr(model, "architecture", model)
    if getattr(architecture, "use_attention", False):
        return (
            "the U-Net uses attention (use_attention: true), which is not translation-"
            "equivariant: each block equals the model applied to that block's read ROI, "
            "not a whole-volume forward pass (block seams may show)",
        )
    return ()


def _phase(model: Any) -> Coordinate | None:
    """The architecture's total downsampling factor, where it declares one."""
    architecture = getattr(model, "architecture", model)
    product = getattr(architecture, "downsample_factor_product", None)
    if product is not None:
        return Coordinate(product)
    factors = getattr(architecture, "downsample_factors", None)
    if factors:
        return Coordinate(math.prod(f[i] for f in factors) for i in range(len(factors[0])))
    return None


def prepare_workflow(workflow: Workflow) -> Prepared:
    """Build the model and check the workflow against the data; writes nothing."""
    model = build_model(workflow.model)
    prepared = prepare(workflow.input, workflow.output, workflow.model, model, workflow.execution)
    if workflow.model.unet is not None and workflow.model.checkpoint is None:
        logger.warning("model.checkpoint is not set: the U-Net has untrained weights (seed 0)")
    return prepared


def execute(
    prepared: Prepared,
    input: InputConfig,
    cluster: ClusterConfig,
    execution: ExecutionConfig,
    progress: bool = True,
) -> RunReport:
    """Create the output (or resume it) and run every pending block on a cluster."""
    from .cluster import connect, torch_threads  # Dask is imported only to run
    from .dashboard import install, page_url
    from .runner import run, signals_restored, start_loading
    from .worker import ModelPlugin

    out = prepared.output
    plan = prepared.plan
    info = prepared.output_info()
    job = Job(
        plan=plan,
        input=prepared.input,
        normalize=input.normalize,
        output=info,
        model=prepared.model,
        device=cluster.device,
        threads=torch_threads(cluster),
        batch_size=execution.batch_size,
        precision=execution.precision,
        compile=execution.compile,
    )
    check_precision(execution.precision, cluster.device, cluster.gpus_per_job > 0)
    install()  # our page, in the dashboard of the scheduler that connect() starts
    # the lock first (a second run is refused), then the cluster: an unreachable one writes nothing
    with (
        OutputLock(prepared.output_path, out.storage_options),
        signals_restored(),
        connect(cluster) as client,
        page_url(client, own_scheduler=cluster.type != "address") as page,
    ):
        loading = start_loading(client, ModelPlugin(job))  # workers load while we go on
        logger.info("dashboard: %s", client.dashboard_link)
        if page:
            logger.info("blockpredict page: %s", page)
        if prepared.resume:
            ledger = Ledger.open(ledger_path(info.path), prepared.geometry(), out.storage_options)
            replay(ledger, events_path(info.path))  # blocks the snapshot missed (a kill)
            logger.info("resuming: %d of %d blocks done", ledger.counts()["done"], plan.num_blocks)
        else:
            prepare_output(info, out.overwrite)
            ledger = Ledger.create(
                ledger_path(info.path), prepared.geometry(), plan.num_blocks, out.storage_options
            )
            reset_events(events_path(info.path))
        expected = cluster.adapt.maximum if cluster.adapt else cluster.n_workers
        return run(
            client,
            job,
            ledger,
            execution,
            progress=progress,
            expected_threads=expected * cluster.threads_per_worker,
            loading=loading,
        )


def predict_workflow(workflow: Workflow, progress: bool = True) -> RunReport:
    """Run a validated workflow end to end."""
    prepared = prepare_workflow(workflow)
    return execute(prepared, workflow.input, workflow.cluster, workflow.execution, progress)


def predict(
    model: Any,
    input: InputConfig | dict[str, Any],
    output: OutputConfig | dict[str, Any],
    cluster: ClusterConfig | dict[str, Any] | None = None,
    execution: ExecutionConfig | dict[str, Any] | None = None,
    progress: bool = True,
) -> RunReport:
    """Predict with a :class:`~blockpredict.model.Model` object, without YAML.

    ``input``, ``output``, ``cluster`` and ``execution`` take the same keys as
    the workflow file's sections. The model is sent to each worker once.
    """
    base = Path.cwd()
    input_cfg = validate_section(InputConfig, input, "input")
    output_cfg = validate_section(OutputConfig, output, "output")
    input_cfg = input_cfg.model_copy(
        update={"container": resolve_container(input_cfg.container, base)}
    )
    output_cfg = output_cfg.model_copy(
        update={"container": resolve_container(output_cfg.container, base)}
    )
    cluster_cfg = validate_section(ClusterConfig, cluster or {}, "cluster")
    execution_cfg = validate_section(ExecutionConfig, execution or {}, "execution")
    check_model_api(model)
    model = place(model, "cpu")
    prepared = prepare(input_cfg, output_cfg, model, model, execution_cfg)
    return execute(prepared, input_cfg, cluster_cfg, execution_cfg, progress)
