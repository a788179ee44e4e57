"""``blockpredict demo``: a synthetic EM-like volume, a small U-Net, one run.

Everything is made here (no downloads): cells as Voronoi regions with dark
membrane-like boundaries, DaCapo's CNNectomeUNet (valid padding) trained for a
few seconds on this volume's known cells (affinities: 1 inside a cell, 0 across a
membrane) and saved as a checkpoint, and a workflow file that the user can edit
and rerun. After the run it writes a preview PNG of the middle section.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from funlib.geometry import Coordinate
from funlib.persistence import prepare_ds

from .build import build_model
from .config import ClusterConfig, ModelConfig, load_workflow
from .preview import write_preview
from .warm_start import begin_for
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


logger = logging.getLogger(__name__)

TRAIN_STEPS = 200  # ~30 s on 2 idle cores; the same weights every time
TRAIN_SECONDS = 120.0  # a cap for a busy machine


def synthetic_cells(
    shape: tuple[int, ...], num_cells: int = 60, seed: int = 0, labels: np.ndarray | None = None
) -> np.ndarray:
    """uint8 volume of bright cells separated by dark membranes, with noise.

    With ``labels`` (an int32 array of ``shape``), also write there each voxel's cell id,
    and -1 on the membranes (where the volume is mostly dark).
    """
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
        if labels is not None:
            cell = np.where(membrane < 0.5, -1, sq.argmin(1))
            labels[z] = cell.reshape(shape[1:])
    return volume


def affinities(labels: np.ndarray, channels: int) -> np.ndarray:
    """float32 targets ``(channels, *shape)``: channel k is 1 where a voxel and its
    neighbour one step back along axis ``k % dims`` lie in the same cell, else 0."""
    out = np.zeros((channels, *labels.shape), np.float32)
    for k in range(channels):
        axis = k % labels.ndim
        back = np.roll(labels, 1, axis=axis)
        out[k] = (labels == back) & (labels >= 0)
    return out


def train(
    model: torch.nn.Module,
    raw: np.ndarray,
    labels: np.ndarray,
    steps: int = TRAIN_STEPS,
    seconds: float = TRAIN_SECONDS,
) -> int:
    """Fit ``model`` (any valid-padding Model) to the affinities of ``labels``: ``steps``
    Adam steps, fewer where ``seconds`` run out first.

    Random crops at the model's input shape, raw scaled by 1/255 (the workflow's
    ``normalize: auto``), class-balanced binary cross-entropy on the logits (the
    sigmoid is the model's eval activation). Returns the number of steps.
    """
    shape_in, (channels, shape_out) = _small_valid_shape(model)
    margin = [(i - o) // 2 for i, o in zip(shape_in, shape_out, strict=True)]
    target_all = affinities(labels, channels)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    start = time.monotonic()
    done, end = 0, start + seconds
    while done < steps and time.monotonic() < end:
        corner = [int(rng.integers(0, s - i + 1)) for s, i in zip(raw.shape, shape_in, strict=True)]
        window = tuple(slice(c, c + i) for c, i in zip(corner, shape_in, strict=True))
        inner = tuple(
            slice(c + m, c + m + o) for c, m, o in zip(corner, margin, shape_out, strict=True)
        )
        x = torch.from_numpy(raw[window].astype(np.float32) / 255)[None, None]
        y = torch.from_numpy(target_all[(slice(None), *inner)])[None]
        positive = float(y.mean().clamp(0.05, 0.95))
        weight = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += 1
    model.eval()
    logger.info(
        "trained the demo U-Net: %d steps of %s voxels in %.0f s, last loss %.3f",
        done,
        "x".join(map(str, shape_in)),
        time.monotonic() - start,
        float(loss.detach()),
    )
    return done


def _small_valid_shape(model: Any, min_output: int = 16) -> tuple[tuple[int, ...], Any]:
    """The smallest input (``model.input_shape`` less whole steps of twice its total
    downsampling) whose output is at least ``min_output`` per axis: cheap training steps."""
    from .model_checks import downsampling_phase

    full = Coordinate(model.input_shape)
    step = Coordinate(2 * s for s in (downsampling_phase(model) or (1,) * full.dims))
    n_max = min(f // s for f, s in zip(full, step, strict=True))
    for n in range(n_max, 0, -1):  # smallest first: failures there are cheap
        candidate = full - step * n
        try:
            channels, shape = model.compute_output_shape(candidate)
        except Exception:
            continue
        if min(shape) >= min_output:
            return tuple(candidate), (channels, shape)
    return tuple(full), model.compute_output_shape(full)


CLUSTER = {"type": "local", "n_workers": 2, "threads_per_worker": 1}


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
    labels = np.empty(SHAPE, np.int32)
    volume = synthetic_cells(SHAPE, labels=labels)
    raw[raw.roi] = volume
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
        "cluster": CLUSTER,
        "execution": {"max_retries": 2},
    }
    path = folder / "workflow.yaml"
    path.write_text(yaml.safe_dump(workflow, sort_keys=False))
    torch.manual_seed(0)
    model = build_model(_model_config(workflow))
    checkpoint = folder / "unet.pt"
    if not _load(model, checkpoint):  # weights of an earlier demo run are reused
        train(model, volume, labels)
        torch.save(model.state_dict(), checkpoint)
    return path


def _load(model: torch.nn.Module, checkpoint: Path) -> bool:
    """Load the weights a previous demo trained, where they fit this model."""
    try:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError):
        return False
    logger.info("reusing the trained weights in %s (delete it to train again)", checkpoint)
    return True


def _model_config(workflow: dict[str, Any]) -> ModelConfig:
    section = {k: v for k, v in workflow["model"].items() if k != "checkpoint"}
    return ModelConfig.model_validate(section)


def run_demo(folder: Path, dashboard_linger: float | None = None) -> int:
    """Make the demo files and predict them on a local cluster; with ``dashboard_linger``,
    the dashboard page stays up that many seconds after the run."""
    folder = folder.resolve()
    begin_for(ClusterConfig.model_validate(CLUSTER))  # the workers' imports overlap training
    print(
        f"writing a synthetic {SHAPE} volume and a U-Net trained on it ({TRAIN_STEPS} steps) "
        f"to {folder}",
        file=sys.stderr,
    )
    path = write_demo_files(folder)
    linger = [] if dashboard_linger is None else [f"execution.dashboard_linger={dashboard_linger}"]
    report = predict_workflow(load_workflow(path, linger))
    print(report.summary(), file=sys.stderr)
    print(f"workflow: {path}")
    print(f"output: {report.output_path}")
    if report.blocks_processed:
        png = folder / "preview.png"
        layout = write_preview(str(folder / "data.zarr" / "raw"), report.output_path, png)
        print(f"preview (z = {layout.z} nm): {png}")
    return report.exit_code
