"""The plan as users read it: what ``blockpredict plan`` prints before any block runs.

Voxels and world units side by side, every array that will be written, what happens
to an existing output, and the plan's warnings (a clipped or snapped ``output.roi``,
block seams, the model's limits), each after ``warning:``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .words import plural

if TYPE_CHECKING:
    from .layout import OutputInfo
    from .workflow import Prepared


def _existing(prepared: Prepared) -> str:
    """What the run will do to an output that exists."""
    from .ledger import Ledger, ledger_path
    from .stores import exists

    if prepared.resume:
        options = prepared.output.storage_options
        counts = Ledger.open(ledger_path(prepared.output_path), storage_options=options).counts()
        return f"exists: resumes, {counts['done']}/{prepared.plan.num_blocks} done"
    if exists(prepared.output_path, prepared.output.storage_options):
        return "exists: overwrite: true deletes it"
    return "created"


def describe_plan(prepared: Prepared) -> str:
    """The plan as a user reads it: voxels and world units side by side."""
    plan = prepared.plan
    out = prepared.output

    def c(x: Any) -> str:
        return "(" + ", ".join(str(v) for v in x) + ")"

    nbytes = prepared.output_nbytes()
    rows = [
        ("input", f"{prepared.input.path} {prepared.input.dtype} ROI {prepared.input.roi}"),
        *(
            [
                (
                    "input level",
                    f"{lv.level} of OME-NGFF image {lv.group} at voxel size "
                    f"{c(lv.voxel_size)} offset {c(lv.offset)}"
                    + (f" (+{c(lv.shift)}, kept in the output's translation)" if lv.shift else ""),
                )
            ]
            if (lv := prepared.input.ome_level)
            else []
        ),
        (
            "input voxel size",
            f"{c(plan.input_voxel_size)} from {prepared.input.voxel_size_source}",
        ),
        (
            "input offset",
            f"{c(prepared.input.roi.offset)} from {prepared.input.offset_source}",
        ),
        ("output voxel size", c(plan.output_voxel_size)),
        (
            "context",
            f"{c(plan.context)} world, {c(plan.context / plan.input_voxel_size)} input voxels",
        ),
        ("read shape", f"{c(plan.read_shape)} voxels = {c(plan.read_size)} world"),
        ("write shape", f"{c(plan.write_shape)} voxels = {c(plan.write_size)} world"),
        ("border", plan.border),
        (
            "output ROI",
            f"offset {c(plan.output_roi.offset)} shape {c(plan.output_roi.shape)} world",
        ),
        ("block grid", f"{c(plan.grid_shape)} = {plural(plan.num_blocks, 'block')}"),
        ("output", f"{out.container}/{out.dataset} ({_existing(prepared)})"),
        *_describe_layout(prepared.output_info()),
        ("output size", f"{nbytes} bytes ({nbytes / 2**30:.3f} GiB)"),
    ]
    width = max(len(k) for k, _ in rows if not k.startswith("output array "))
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    warnings = (*prepared.input.warnings, *plan.warnings, *prepared.warnings)
    lines += [f"warning: {w}" for w in warnings]
    return "\n".join(lines)


def _describe_layout(info: OutputInfo) -> list[tuple[str, str]]:
    """One row per written array: OME-NGFF images and their levels."""
    version = "0.4" if info.zarr_format == 2 else "0.5"
    rows = [
        (
            "output format",
            f"zarr v{info.zarr_format}, OME-NGFF {version}, compressor {info.compressor}",
        )
    ]
    for image in info.images:
        lo, hi = image.channels
        for level in image.levels:
            shards = f" shards {tuple(level.shards)}" if level.shards else ""
            rows.append(
                (
                    f"output array {os.path.basename(image.path)}/{level.name}",
                    f"shape {tuple(level.shape)} chunks {tuple(level.chunks)}{shards} "
                    f"{image.dtype}, channels [{lo}, {hi}), voxel size {tuple(level.voxel_size)}",
                )
            )
    return rows
