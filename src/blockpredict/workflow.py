"""A workflow from config to report: check everything, then plan, then run.

:func:`prepare` does every check that can fail on bad input (input, model,
checkpoint, channels, voxel sizes, ROI, existing output) before anything is
written; :func:`execute` then prepares the output and runs the blocks.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from .build import build_model
from .config import (
    ClusterConfig,
    ExecutionConfig,
    InputConfig,
    OutputConfig,
    Workflow,
    validate_section,
)
from .errors import GeometryError, ModelError
from .ledger import Ledger, ledger_path
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
from .job import Job, describe

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

    @property
    def output_path(self) -> str:
        return output_path(self.output.container, self.output.dataset)

    def geometry(self) -> dict[str, Any]:
        """Everything that decides which voxels a block id reads and writes."""
        return {
            "plan": self.plan.to_dict(),
            "input": self.input.path,
            "output": self.output_path,
            "dtype": self.output.dtype,
            "num_out_channels": self.num_out_channels,
            "chunks": list(self.plan.write_shape),
        }

    def output_nbytes(self) -> int:
        itemsize = np.dtype(self.output.dtype).itemsize
        return self.num_out_channels * math.prod(self.plan.output_shape) * itemsize


def prepare(
    input: InputConfig,
    output: OutputConfig,
    model_source: Any,
    model: Any,
    execution: ExecutionConfig | None = None,
) -> Prepared:
    """Open the input, check the model against it and plan the blocks."""
    info = open_input(input.container, input.dataset)
    normalization(info.dtype, input.normalize)
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
        ) from None
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
    prepared = Prepared(info, output, plan, int(channels), model_source)
    return _check_existing(prepared, execution or ExecutionConfig())


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
    if out.overwrite or not os.path.exists(path):
        return prepared
    ledger = ledger_path(path)
    if execution.resume and Ledger.exists(ledger):
        Ledger.open(ledger, prepared.geometry())  # raises when the geometry changed
        return replace(prepared, resume=True)
    check_output(out.container, out.dataset, out.overwrite)
    return prepared


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
    from .runner import run

    out = prepared.output
    plan = prepared.plan
    info = OutputInfo(
        prepared.output_path,
        plan.output_roi,
        plan.output_voxel_size,
        out.dtype,
        prepared.num_out_channels,
    )
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
    with connect(cluster) as client:  # before writing: an unreachable cluster writes nothing
        logger.info("dashboard: %s", client.dashboard_link)
        if prepared.resume:
            ledger = Ledger.open(ledger_path(info.path), prepared.geometry())
            logger.info("resuming: %d of %d blocks done", ledger.counts()["done"], plan.num_blocks)
        else:
            prepare_output(
                out.container,
                out.dataset,
                plan.output_roi,
                plan.output_voxel_size,
                plan.write_shape,
                prepared.num_out_channels,
                out.dtype,
                prepared.input.axis_names,
                prepared.input.units,
                out.overwrite,
            )
            ledger = Ledger.create(ledger_path(info.path), prepared.geometry(), plan.num_blocks)
        expected = cluster.adapt.maximum if cluster.adapt else cluster.n_workers
        return run(
            client,
            job,
            ledger,
            execution,
            progress=progress,
            expected_threads=expected * cluster.threads_per_worker,
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
    input_cfg = input_cfg.model_copy(update={"container": (base / input_cfg.container).resolve()})
    output_cfg = output_cfg.model_copy(
        update={"container": (base / output_cfg.container).resolve()}
    )
    cluster_cfg = validate_section(ClusterConfig, cluster or {}, "cluster")
    execution_cfg = validate_section(ExecutionConfig, execution or {}, "execution")
    model = model.cpu().eval()
    prepared = prepare(input_cfg, output_cfg, model, model, execution_cfg)
    return execute(prepared, input_cfg, cluster_cfg, execution_cfg, progress)
