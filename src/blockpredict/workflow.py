"""A workflow from config to report: check everything, then plan, then run.

:func:`prepare` does every check that can fail on bad input (input, model,
checkpoint, channels, voxel sizes, ROI, existing output) before anything is
written; :func:`execute` then prepares the output and runs the blocks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from .build import build_model, build_shapes, check_model_api, place
from .config import (
    ClusterConfig,
    ExecutionConfig,
    InputConfig,
    OutputConfig,
    Workflow,
    resolve_container,
    validate_section,
)
from .errors import GeometryError, ModelError
from .events import events_path, replay
from .events import reset as reset_events
from .fingerprint import model_fingerprint
from .job import Job, describe
from .layout import describe_output
from .ledger import Ledger, ledger_path
from .location import check_not_input, check_writable
from .lock import OutputLock
from .model_checks import (
    check_channels,
    downsampling_phase,
    model_warnings,
    probe_output_shape,
    warn_unbounded,
)
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
from .stores import check_container, exists
from .urls import is_url
from .words import plural

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
    model_shape: tuple[int, tuple[int, ...]] | None = None  # the built model's output_shape

    @property
    def output_path(self) -> str:
        return output_path(self.output.container, self.output.dataset)

    def output_info(self) -> OutputInfo:
        """The output's layout: images, levels, chunks, shards (checked at plan time)."""
        info = self.input
        return describe_output(
            self.plan,
            self.output,
            self.num_out_channels,
            info.axis_names,
            info.units,
            info.zarr_format,
            info.ome_level.shift if info.ome_level else (),
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
    plan, channels = plan_blocks(info, output, model)
    for warning in plan.warnings:
        logger.warning(warning)
    warnings = model_warnings(model)
    for warning in warnings:
        logger.warning(warning)
    check_channels(model_source, int(channels))
    warn_unbounded(model, output.dtype)
    fingerprint = model_fingerprint(model, model_source, scaling)
    prepared = Prepared(
        info,
        output,
        plan,
        int(channels),
        model_source,
        warnings=warnings,
        fingerprint=fingerprint,
        model_shape=_model_shape(model),
    )
    prepared.output_info()  # shard, chunk, pyramid and channel-group errors before anything runs
    return _check_existing(prepared, execution or ExecutionConfig())


def _model_shape(model: Any) -> tuple[int, tuple[int, ...]] | None:
    """The model's output channels and shape at its input shape, where it has them."""
    channels, shape = getattr(model, "num_out_channels", None), getattr(model, "output_shape", None)
    if channels is None or shape is None:
        return None
    return int(channels), tuple(int(v) for v in shape)


def plan_blocks(info: InputInfo, output: OutputConfig, model: Any) -> tuple[BlockPlan, int]:
    """The block plan of ``model`` over the input, and the model's output channels.

    Needs only the model's shapes (``count_blocks`` passes one without weights).
    """
    if info.num_channels != model.num_in_channels:
        raise ModelError(
            f"input has {plural(info.num_channels, 'channel')}, "
            f"the model expects {model.num_in_channels}",
            info.path,
            "use a matching input or model (a channel axis is named 'c^')",
        )
    eval_input_shape = Coordinate(model.eval_input_shape)
    if eval_input_shape.dims > info.voxel_size.dims:
        raise ModelError(
            f"model has {plural(eval_input_shape.dims, 'spatial dim')}, "
            f"the input has {info.voxel_size.dims}",
            info.path,
            "use a model with at most as many dims as the input",
        )
    try:
        channels, eval_output_shape = probe_output_shape(model, eval_input_shape)
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
                f"output.roi has {plural(len(output.roi.offset), 'dim')}, the input has {vin.dims}",
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
        phase=downsampling_phase(model),
    )
    return plan, int(channels)


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


def prepare_workflow(workflow: Workflow) -> Prepared:
    """Build the model and check the workflow against the data; writes nothing."""
    model = build_model(workflow.model)
    prepared = prepare(workflow.input, workflow.output, workflow.model, model, workflow.execution)
    if workflow.model.unet is not None and workflow.model.checkpoint is None:
        logger.warning("model.checkpoint is not set: the U-Net has untrained weights (seed 0)")
    return prepared


def count_blocks(workflow: Workflow) -> int:
    """The workflow's number of blocks, from the model's shapes: its weights never load.

    A model that cannot be built without its weights (a factory that reads them) is
    built in full instead.
    """
    try:
        model = build_shapes(workflow.model)
    except Exception:  # built in full below, where a real error is raised as usual
        logger.debug("the model's shapes need its weights", exc_info=True)
        model = build_model(workflow.model)
    source = workflow.input
    info = open_input(
        source.container, source.dataset, source.voxel_size, source.offset, source.storage_options
    )
    return plan_blocks(info, workflow.output, model)[0].num_blocks


def execute(
    prepared: Prepared,
    input: InputConfig,
    cluster: ClusterConfig,
    execution: ExecutionConfig,
    progress: bool = True,
) -> RunReport:
    """Create the output (or resume it) and run every pending block on a cluster."""
    from .cluster import connect, torch_threads  # Dask is imported only to run
    from .dashboard import linger, page_url, show_final
    from .loading import start_loading
    from .runner import run
    from .signals import signals_restored
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
        cuda_graphs=execution.cuda_graphs,
        io_threads=execution.io_threads,
        model_shape=prepared.model_shape,
    )
    check_precision(execution.precision, cluster.device, cluster.gpus_per_job > 0)
    # the lock first (a second run is refused), then the cluster: an unreachable one writes nothing
    with (
        OutputLock(prepared.output_path, out.storage_options),
        signals_restored(),
        connect(cluster) as client,
        page_url(client, own_scheduler=cluster.type != "address") as page,
    ):
        loading = start_loading(client, ModelPlugin(job))  # workers load while we go on
        if prepared.resume:
            ledger = Ledger.open(ledger_path(info.path), prepared.geometry(), out.storage_options)
            replay(ledger, events_path(info.path))  # blocks the snapshot missed (a kill)
            done, total = ledger.counts()["done"], plural(plan.num_blocks, "block")
            logger.info("resuming: %d of %s done", done, total)
        else:
            prepare_output(info, out.overwrite)
            ledger = Ledger.create(
                ledger_path(info.path), prepared.geometry(), plan.num_blocks, out.storage_options
            )
            reset_events(events_path(info.path))
        expected = cluster.adapt.maximum if cluster.adapt else cluster.n_workers
        report = run(
            client,
            job,
            ledger,
            execution,
            progress=progress,
            expected_threads=expected * cluster.threads_per_worker,
            loading=loading,
            under_way=lambda: _show_dashboard(client, page, execution),
        )
        show_final()  # open pages draw how the run ended before the cluster closes
        if page and execution.dashboard_linger and not report.interrupted:
            logger.info("%s: the page stays up (Ctrl-C to close it)", _page_lasts(execution))
            linger(execution.dashboard_linger, client)
        return report


def _show_dashboard(client: Any, page: str | None, execution: ExecutionConfig) -> None:
    """Connect the dashboard and print its URLs, once the run is under way (Bokeh's
    imports no longer delay the first block); the run goes on without it if that fails."""
    from .cluster import attach_dashboard

    try:
        attach_dashboard(client)
    except Exception as e:
        logger.warning("no dashboard: %s", describe(e))
        return
    logger.info("dashboard: %s", client.dashboard_link)
    if page:
        logger.info("blockpredict page: %s (%s)", page, _page_lasts(execution))


def _page_lasts(execution: ExecutionConfig) -> str:
    if execution.dashboard_linger:
        return f"up until {execution.dashboard_linger:g} s after the run"
    return "closes with the run; --dashboard-linger S keeps it up after"


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
