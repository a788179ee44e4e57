"""A workflow from config to report: check everything, then plan, then run.

:func:`prepare` does every check that can fail on bad input (input, model,
checkpoint, channels, voxel sizes, ROI, existing output) before anything is
written; :func:`execute` then prepares the output and runs the blocks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from funlib.geometry import Coordinate, Roi

from .build import build_model
from .cluster import connect, torch_threads
from .config import ClusterConfig, ExecutionConfig, InputConfig, OutputConfig, Workflow
from .errors import ModelError
from .plan import BlockPlan, make_plan
from .report import RunReport
from .runner import run
from .storage import InputInfo, check_output, normalization, open_input, prepare_output
from .worker import Job

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A checked workflow: the input's metadata, the model's channels and the plan."""

    input: InputInfo
    output: OutputConfig
    plan: BlockPlan
    num_out_channels: int
    model: Any  # a ModelConfig for the workers to rebuild, or a Model object

    def output_nbytes(self) -> int:
        itemsize = np.dtype(self.output.dtype).itemsize
        return self.num_out_channels * math.prod(self.plan.output_shape) * itemsize


def prepare(
    input: InputConfig, output: OutputConfig, model_source: Any, model: Any
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
            f"model has {eval_input_shape.dims} spatial dims, the input has "
            f"{info.voxel_size.dims}",
            info.path,
            "use a model with at most as many dims as the input",
        )
    channels, eval_output_shape = model.compute_output_shape(eval_input_shape)
    model_dims = eval_input_shape.dims
    vin = info.voxel_size
    vout = Coordinate(model.scale(Coordinate(vin[vin.dims - model_dims :])))
    requested = None
    if output.roi is not None:
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
    check_output(output.container, output.dataset, output.overwrite)
    return Prepared(info, output, plan, int(channels), model_source)


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
    if workflow.model.unet is not None and workflow.model.checkpoint is None:
        logger.warning("model.checkpoint is not set: the U-Net has untrained weights (seed 0)")
    model = build_model(workflow.model)
    return prepare(workflow.input, workflow.output, workflow.model, model)


def execute(
    prepared: Prepared,
    input: InputConfig,
    cluster: ClusterConfig,
    execution: ExecutionConfig,
    progress: bool = True,
) -> RunReport:
    """Create the output and run every block on a cluster."""
    out = prepared.output
    plan = prepared.plan
    info = prepare_output(
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
    job = Job(
        plan=plan,
        input=prepared.input,
        normalize=input.normalize,
        output=info,
        model=prepared.model,
        device=cluster.device,
        threads=torch_threads(cluster),
    )
    with connect(cluster) as client:
        if progress:
            logger.info("dashboard: %s", client.dashboard_link)
        return run(client, job, execution.max_retries, progress=progress)


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
    input_cfg = InputConfig.model_validate(input)
    output_cfg = OutputConfig.model_validate(output)
    input_cfg = input_cfg.model_copy(update={"container": (base / input_cfg.container).resolve()})
    output_cfg = output_cfg.model_copy(
        update={"container": (base / output_cfg.container).resolve()}
    )
    cluster_cfg = ClusterConfig.model_validate(cluster or {})
    execution_cfg = ExecutionConfig.model_validate(execution or {})
    model = model.cpu().eval()
    prepared = prepare(input_cfg, output_cfg, model, model)
    return execute(prepared, input_cfg, cluster_cfg, execution_cfg, progress)
