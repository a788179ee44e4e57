"""``blockpredict demo``: a synthetic EM-like volume, a small U-Net, one run.

Everything is made here (no downloads): cells as Voronoi regions with dark
membrane-like boundaries, DaCapo's CNNectomeUNet (valid padding) with
fixed-seed weights saved as a checkpoint, and a workflow file that the user
can edit and rerun.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from funlib.geometry import Coordinate
from funlib.persistence import prepare_ds

from .build import build_model
from .config import ModelConfig, load_workflow
from .workflow import predict_workflow

SHAPE = (128, 192, 192)
VOXEL_SIZE = (8, 8, 8)

# DaCapo's CNNectomeUNetConfig keys (constant_upsample: true, its default)
UNET = {
    "input_shape": [76, 76, 76],
    "fmaps_in": 1,
    "num_fmaps": 8,
    "fmaps_out": 8,
    "fmap_inc_factor": 3,
    "downsample_factors": [[2, 2, 2]],
}


def synthetic_cells(shape: tuple[int, ...], num_cells: int = 60, seed: int = 0) -> np.ndarray:
    """uint8 volume of bright cells separated by dark membranes, with noise."""
    rng = np.random.default_rng(seed)
    centers = (rng.uniform(0, 1, size=(num_cells, len(shape))) * np.array(shape)).astype(np.float32)
    brightness = rng.uniform(140, 220, size=num_cells).astype(np.float32)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape[1:]), indexing="ij"), axis=-1)
    plane = grid.reshape(-1, len(shape) - 1).astype(np.float32)
    volume = np.empty(shape, dtype=np.uint8)
    for z in range(shape[0]):
        points = np.concatenate([np.full((len(plane), 1), z, np.float32), plane], axis=1)
        # squared distances to all centers, without a (points, centers, dims) array
        sq = (points**2).sum(1)[:, None] - 2 * points @ centers.T + (centers**2).sum(1)
        two = np.partition(sq, 1, axis=1)[:, :2]
        d = np.sqrt(np.maximum(two, 0))
        membrane = np.clip((d[:, 1] - d[:, 0]) / 3.0, 0, 1)
        section = brightness[sq.argmin(1)] * membrane + 30 * (1 - membrane)
        section += rng.normal(0, 12, size=section.shape).astype(np.float32)
        volume[z] = np.clip(section, 0, 255).reshape(shape[1:]).astype(np.uint8)
    return volume


def write_demo_files(folder: Path) -> Path:
    """Volume, checkpoint and workflow under ``folder``; returns the workflow path."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = prepare_ds(
        str(folder / "data.zarr" / "raw"),
        shape=SHAPE,
        voxel_size=Coordinate(VOXEL_SIZE),
        axis_names=["z", "y", "x"],
        units=["nm", "nm", "nm"],
        dtype=np.uint8,
        mode="w",
    )
    raw[raw.roi] = synthetic_cells(SHAPE)
    workflow = {
        "input": {"container": "data.zarr", "dataset": "raw", "normalize": "auto"},
        "model": {
            "unet": UNET,
            "head": {"out_channels": 3, "kernel_size": 1},
            "checkpoint": "unet.pt",
            "eval_activation": "sigmoid",
        },
        "output": {
            "container": "prediction.zarr",
            "dataset": "affinities",
            "dtype": "uint8",
            "border": "valid",
            "overwrite": True,
        },
        "cluster": {"type": "local", "n_workers": 2, "threads_per_worker": 1},
        "execution": {"max_retries": 2},
    }
    path = folder / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    torch.manual_seed(0)
    model = build_model(_model_config(workflow))
    torch.save(model.state_dict(), folder / "unet.pt")
    return path


def _model_config(workflow: dict[str, Any]) -> ModelConfig:
    section = {k: v for k, v in workflow["model"].items() if k != "checkpoint"}
    return ModelConfig.model_validate(section)


def run_demo(folder: Path) -> int:
    """Make the demo files and predict them on a local cluster."""
    folder = folder.resolve()
    print(f"writing a synthetic {SHAPE} volume and a U-Net to {folder}", file=sys.stderr)
    path = write_demo_files(folder)
    report = predict_workflow(load_workflow(path))
    print(report.summary(), file=sys.stderr)
    print(f"workflow: {path}")
    print(f"output: {report.output_path}")
    return report.exit_code
