"""Bad input through the real CLI: one ``error:`` line, exit code 2, nothing written.

Every case runs the CLI's ``main`` on real zarr data in ``tmp_path`` with a tiny
valid U-Net workflow, changes one thing to make it bad, and checks that the
engine rejects it before any cluster starts: exactly one line on stderr
(``error: ...`` with a specific phrase, no traceback), nothing on stdout, exit
code 2, no output container and no report. ``main`` runs in this process
(``conftest.cli_in_process``: seconds of imports saved per case); the tests of
the traceback and of the time a rejection takes run ``python -m blockpredict.cli``.

The base workflow sets a matching checkpoint so that the only line on stderr
is the error (a U-Net without a checkpoint logs an "untrained weights"
warning first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import cli_in_process
from funlib.geometry import Coordinate
from funlib.persistence import prepare_ds

from blockpredict.build import build_model
from blockpredict.config import ModelConfig

# 8 voxels of context on each side: output 4^3 for input 20^3 (checked by
# test_base_workflow_is_valid with `blockpredict plan`).
UNET = {
    "input_shape": [20, 20, 20],
    "fmaps_in": 1,
    "num_fmaps": 2,
    "fmap_inc_factor": 2,
    "downsample_factors": [[2, 2, 2]],
}
HEAD = {"out_channels": 1}
TIMEOUT_S = 60  # a bad input that takes this long started something it should not

# A factory model whose declared shapes give a context of half a voxel:
# Conv3d(kernel 2) maps 20^3 to 19^3, (20 - 19) / 2 is not whole.
CONV2_FACTORY = """\
import torch


def make():
    return torch.nn.Conv3d(1, 1, 2)


def two_channels():
    return torch.nn.Conv3d(2, 1, 3)
"""


# --- helpers ---------------------------------------------------------------


def make_dataset(
    path: Path,
    shape: tuple[int, ...],
    voxel_size: tuple[int, ...] = (1, 1, 1),
    dtype: Any = np.uint8,
    channels: bool = False,
    fill: Any = None,
) -> None:
    spatial = len(shape) - int(channels)
    names = ["z", "y", "x"][3 - spatial :]
    array = prepare_ds(
        str(path),
        shape=shape,
        offset=Coordinate((0,) * spatial),
        voxel_size=Coordinate(voxel_size),
        axis_names=(["c^"] if channels else []) + names,
        types=(["channel"] if channels else []) + ["space"] * spatial,
        dtype=dtype,
        mode="w",
    )
    if fill is not None:
        array[:] = fill


def save_checkpoint(path: Path, unet: dict[str, Any], head: dict[str, Any] = HEAD) -> Path:
    """The state_dict of a U-Net + head built exactly like the engine builds it."""
    model = build_model(ModelConfig.model_validate({"unet": unet, "head": head}))
    torch.save(model.state_dict(), path)
    return path


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to compare before and after)."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


class Project:
    """A folder with a valid input, checkpoint and workflow; break one thing per test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.output = root / "out.zarr"
        self.report = root / "report.json"
        make_dataset(
            root / "data.zarr" / "raw",
            (40, 40, 40),
            fill=(np.arange(40**3) % 251).astype(np.uint8).reshape(40, 40, 40),
        )
        save_checkpoint(root / "model.pt", UNET)
        self.workflow: dict[str, Any] = {
            "input": {"container": "data.zarr", "dataset": "raw"},
            "model": {"unet": dict(UNET), "head": dict(HEAD), "checkpoint": "model.pt"},
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"type": "local", "n_workers": 1},
        }
        self.workflow_text: str | None = None  # raw YAML text instead of the mapping

    def write_workflow(self) -> Path:
        path = self.root / "workflow.yaml"
        if self.workflow_text is not None:
            path.write_text(self.workflow_text)
        else:
            path.write_text(yaml.safe_dump(self.workflow, sort_keys=False))
        return path

    def cli(
        self, *args: str, debug: bool = False, real: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """The CLI in this process (``cli_in_process``), or with ``real`` in a subprocess."""
        args = (*(["--debug"] if debug else []), *args)
        start = time.perf_counter()
        if real:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.root), *filter(None, [env.get("PYTHONPATH")])]
            )
            command = [sys.executable, "-m", "blockpredict.cli", *args]
            result = subprocess.run(
                command, cwd=self.root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        else:
            result = cli_in_process(list(args), self.root)
        result.elapsed = time.perf_counter() - start  # type: ignore[attr-defined]
        return result

    def predict(
        self, *extra: str, debug: bool = False, real: bool = False
    ) -> subprocess.CompletedProcess[str]:
        workflow = self.write_workflow()
        return self.cli(
            "predict",
            str(workflow),
            "--report",
            str(self.report),
            "--no-progress",
            *extra,
            debug=debug,
            real=real,
        )

    def plan(self, *extra: str, real: bool = False) -> subprocess.CompletedProcess[str]:
        return self.cli("plan", str(self.write_workflow()), *extra, real=real)


def assert_rejected(
    result: subprocess.CompletedProcess[str], project: Project, *phrases: str
) -> str:
    """Exit code 2, exactly one stderr line ``error: ...`` naming ``phrases``, nothing written."""
    lines = result.stderr.strip().splitlines()
    context = f"exit code {result.returncode}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr, context
    assert result.returncode == 2, context
    assert len(lines) == 1, context
    line = lines[0]
    assert line.startswith("error: "), context
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    assert result.stdout == "", context
    assert not project.output.exists(), f"output written: {sorted(tree(project.output))}"
    assert not project.report.exists(), "report written"
    return line


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


# --- the cases -------------------------------------------------------------
# Each case breaks the project and returns (extra CLI args, expected phrases).

Case = Callable[[Project], tuple[list[str], list[str]]]


def missing_input_container(p: Project):
    p.workflow["input"]["container"] = "missing.zarr"
    return [], ["input container not found", "missing.zarr"]


def missing_input_dataset(p: Project):
    p.workflow["input"]["dataset"] = "nope"
    return [], ["input dataset 'nope' not found", "input.dataset"]


def channel_mismatch(p: Project):
    make_dataset(p.root / "data.zarr" / "two", (2, 40, 40, 40), channels=True)
    p.workflow["input"]["dataset"] = "two"
    return [], ["input has 2 channels, the model expects 1"]


def voxel_size_not_divisible_by_scale(p: Project):
    unet = dict(UNET, upsample_factors=[[2, 2, 2]])
    save_checkpoint(p.root / "up.pt", unet)
    make_dataset(p.root / "data.zarr" / "v3", (40, 40, 40), voxel_size=(3, 3, 3))
    p.workflow["input"]["dataset"] = "v3"
    p.workflow["model"] = {"unet": unet, "head": dict(HEAD), "checkpoint": "up.pt"}
    return [], ["voxel size (3, 3, 3) is not divisible by upsample factor (2, 2, 2)"]


def context_not_whole_voxels(p: Project):
    (p.root / "conv2_factory.py").write_text(CONV2_FACTORY)
    p.workflow["model"] = {
        "factory": "conv2_factory:make",
        "input_shape": [20, 20, 20],
        "num_in_channels": 1,
        "num_out_channels": 1,
    }
    return [], ["context (0.5, 0.5, 0.5) is not a whole number of input voxels"]


def factory_declares_wrong_channels(p: Project):
    # the module takes 2 channels, the workflow declares 1: the shape probe fails
    (p.root / "conv2_factory.py").write_text(CONV2_FACTORY)
    p.workflow["model"] = {
        "factory": "conv2_factory:two_channels",
        "input_shape": [20, 20, 20],
        "num_in_channels": 1,
        "num_out_channels": 1,
    }
    return [], ["model.factory"]


def factory_bad_kwargs(p: Project):
    (p.root / "conv2_factory.py").write_text(CONV2_FACTORY)
    p.workflow["model"] = {
        "factory": "conv2_factory:make",
        "kwargs": {"bogus": 1},
        "input_shape": [20, 20, 20],
        "num_in_channels": 1,
        "num_out_channels": 1,
    }
    return [], ["model.factory", "bogus"]


def roi_outside_input(p: Project):
    p.workflow["output"]["roi"] = {"offset": [100, 100, 100], "shape": [10, 10, 10]}
    return [], ["is outside the input ROI", "output.roi"]


def roi_empty_small_input(p: Project):
    make_dataset(p.root / "data.zarr" / "small", (12, 12, 12))
    p.workflow["input"]["dataset"] = "small"
    return [], ["output ROI is empty after shrinking the input ROI", "(8, 8, 8)"]


def roi_inside_border(p: Project):
    p.workflow["output"]["roi"] = {"offset": [0, 0, 0], "shape": [5, 5, 5]}
    return [], ["output ROI is empty after shrinking the input ROI", "output.roi"]


def roi_wrong_dims(p: Project):
    # a 2D ROI for a 3D input
    p.workflow["output"]["roi"] = {"offset": [10, 10], "shape": [20, 20]}
    return [], ["output.roi"]


def input_dtype_complex(p: Project):
    make_dataset(p.root / "data.zarr" / "cplx", (40, 40, 40), dtype=np.complex64)
    p.workflow["input"]["dataset"] = "cplx"
    return [], ["unsupported input dtype complex64"]


def input_dtype_bool(p: Project):
    make_dataset(p.root / "data.zarr" / "mask", (40, 40, 40), dtype=bool)
    p.workflow["input"]["dataset"] = "mask"
    return [], ["unsupported input dtype bool"]


def output_dtype_int64(p: Project):
    p.workflow["output"]["dtype"] = "int64"
    return [], ["invalid value for output.dtype", "int64"]


def head_zero_channels(p: Project):
    p.workflow["model"] = {"unet": dict(UNET), "head": {"out_channels": 0}}
    return [], ["out_channels"]


def checkpoint_missing(p: Project):
    p.workflow["model"]["checkpoint"] = "missing.pt"
    return [], ["checkpoint not found", "missing.pt"]


def checkpoint_size_mismatch(p: Project):
    # same layers, 3 instead of 2 feature maps: every key exists, shapes differ
    save_checkpoint(p.root / "wide.pt", dict(UNET, num_fmaps=3))
    p.workflow["model"]["checkpoint"] = "wide.pt"
    return [], [
        "checkpoint does not match the model",
        "shapes differ: architecture.unet.l_conv.0.conv_pass.0.weight is (3, 1, 3, 3, 3)",
        "wide.pt",
    ]


def checkpoint_other_keys(p: Project):
    # the bare architecture's state_dict (unet.* keys load), but no head and a stray key
    model = build_model(ModelConfig.model_validate({"unet": UNET, "head": HEAD}))
    state = {**model.architecture.state_dict(), "down.0.0.weight": torch.zeros(2)}
    torch.save(state, p.root / "body.pt")
    p.workflow["model"]["checkpoint"] = "body.pt"
    return [], [
        "checkpoint does not match the model",
        "missing keys: prediction_head.weight (1, 2, 1, 1, 1)",
        "unexpected keys: down.0.0.weight (2,)",
    ]


def checkpoint_garbage(p: Project):
    (p.root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    p.workflow["model"]["checkpoint"] = "garbage.pt"
    return [], ["cannot load checkpoint", "garbage.pt"]


def malformed_yaml(p: Project):
    p.workflow_text = "input: {container: data.zarr, dataset: raw\nmodel: [unet\n"
    return [], ["malformed YAML", "workflow.yaml:"]


def unknown_key_did_you_mean(p: Project):
    p.workflow["output"]["overwrit"] = True
    return [], ["unknown key 'output.overwrit'", "did you mean 'overwrite'?"]


def unknown_top_level_key(p: Project):
    p.workflow["clusterr"] = {"n_workers": 2}
    return [], ["unknown key 'clusterr'", "did you mean 'cluster'?"]


def unknown_top_level_key_no_match(p: Project):
    p.workflow["banana"] = 1
    return [], ["unknown key 'banana'", "known keys: input, model, output, cluster, execution"]


def set_unknown_key(p: Project):
    return ["--set", "cluster.n_worker=4"], [
        "unknown key 'cluster.n_worker'",
        "did you mean 'n_workers'?",
    ]


def set_without_value(p: Project):
    return ["--set", "cluster.n_workers"], ["bad --set 'cluster.n_workers'"]


BAD_FORWARD_FACTORY = """\
import torch


class Bad(torch.nn.Module):
    def forward(self, x):
        raise ValueError("shapes do not add up")


def bad():
    return Bad()


def seven():
    return torch.nn.Conv3d(1, 7, 3)
"""


def _factory(p: Project, name: str, out_channels: int) -> None:
    (p.root / "bad_forward.py").write_text(BAD_FORWARD_FACTORY)
    p.workflow["model"] = {
        "factory": f"bad_forward:{name}",
        "input_shape": [20, 20, 20],
        "num_in_channels": 1,
        "num_out_channels": out_channels,
    }


def probe_raises_value_error(p: Project):
    _factory(p, "bad", 1)
    return [], ["the model fails", "ValueError: shapes do not add up"]


def factory_returns_more_channels(p: Project):
    _factory(p, "seven", 4)
    return [], ["the model returns 7 channels, the workflow declares 4"]


def set_malformed_value(p: Project):
    return ["--set", "output.roi={offset: [0"], ["malformed --set value for output.roi"]


def output_under_proc(p: Project):
    p.workflow["output"]["container"] = "/proc/blockpredict-out.zarr"
    return [], ["the output cannot be written", "/proc"]


def output_below_a_file(p: Project):
    p.workflow["output"]["container"] = "model.pt/out.zarr"
    return [], ["the output cannot be written", "model.pt is not a folder"]


def output_is_input(p: Project):
    p.workflow["output"] = {"container": "data.zarr", "dataset": "raw", "overwrite": True}
    return [], ["the output is the input"]


def report_unwritable(p: Project):
    return ["--report", "/proc/report.json"], ["the report cannot be written", "/proc"]


CASES: list[Case] = [
    probe_raises_value_error,
    factory_returns_more_channels,
    set_malformed_value,
    output_under_proc,
    output_below_a_file,
    output_is_input,
    report_unwritable,
    missing_input_container,
    missing_input_dataset,
    channel_mismatch,
    voxel_size_not_divisible_by_scale,
    context_not_whole_voxels,
    factory_declares_wrong_channels,
    factory_bad_kwargs,
    roi_outside_input,
    roi_empty_small_input,
    roi_inside_border,
    roi_wrong_dims,
    input_dtype_complex,
    input_dtype_bool,
    output_dtype_int64,
    head_zero_channels,
    checkpoint_missing,
    checkpoint_size_mismatch,
    checkpoint_other_keys,
    checkpoint_garbage,
    malformed_yaml,
    unknown_key_did_you_mean,
    unknown_top_level_key,
    unknown_top_level_key_no_match,
    set_unknown_key,
    set_without_value,
]


# --- tests -----------------------------------------------------------------


def test_base_workflow_is_valid(project: Project) -> None:
    """The unbroken project plans: 8 voxels of context, 4^3 writes (so the cases are minimal)."""
    result = project.plan()
    assert result.returncode == 0, result.stderr
    assert "context            (8, 8, 8) world" in result.stdout
    assert "write shape        (4, 4, 4) voxels" in result.stdout
    assert "offset (8, 8, 8) shape (24, 24, 24)" in result.stdout
    assert result.stderr == ""  # a checkpoint is set: no warning
    assert not project.output.exists()


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_predict_rejects_bad_input(project: Project, case: Case) -> None:
    extra, phrases = case(project)
    result = project.predict(*extra)
    assert_rejected(result, project, *phrases)


def test_predict_rejects_missing_workflow_file(project: Project) -> None:
    result = project.cli(
        "predict", str(project.root / "nope.yaml"), "--report", str(project.report)
    )
    assert_rejected(result, project, "workflow file not found", "nope.yaml")


@pytest.mark.parametrize(
    "case",
    [channel_mismatch, context_not_whole_voxels, roi_inside_border, unknown_key_did_you_mean],
    ids=lambda c: c.__name__,
)
def test_plan_rejects_bad_input(project: Project, case: Case) -> None:
    extra, phrases = case(project)
    assert_rejected(project.plan(*extra), project, *phrases)


def test_existing_output_is_not_overwritten(project: Project) -> None:
    dataset = project.output / "pred"
    make_dataset(dataset, (1, 24, 24, 24), dtype=np.float32, channels=True, fill=7.0)
    before = tree(project.output)
    assert before, "the existing output has files"

    result = project.predict()

    lines = result.stderr.strip().splitlines()
    context = f"exit code {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, context
    assert result.returncode == 2, context
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert "output dataset exists" in lines[0]
    assert "overwrite" in lines[0]
    assert result.stdout == ""
    assert tree(project.output) == before, "the existing output changed"
    assert not project.report.exists()


def test_debug_shows_a_traceback(project: Project) -> None:
    project.workflow["input"]["container"] = "missing.zarr"
    result = project.predict(debug=True, real=True)  # the interpreter prints the traceback
    assert result.returncode != 0, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "InputError" in result.stderr
    assert "input container not found" in result.stderr.strip().splitlines()[-1]
    assert not project.output.exists()
    assert not project.report.exists()


def test_debug_shows_the_chained_cause(project: Project) -> None:
    probe_raises_value_error(project)
    result = project.predict("--debug")  # after the command
    assert result.returncode != 0
    assert "ValueError: shapes do not add up" in result.stderr
    assert "ModelError" in result.stderr.strip().splitlines()[-1]


def test_plan_checks_output_location(project: Project) -> None:
    for case in (output_under_proc, output_below_a_file, output_is_input):
        extra, phrases = case(project)
        assert_rejected(project.plan(*extra), project, *phrases)


def test_bad_input_fails_fast(project: Project) -> None:
    """A rejected workflow never starts a cluster: it costs little more than the imports."""
    project.workflow["output"]["roi"] = {"offset": [0, 0, 0], "shape": [5, 5, 5]}
    bad = project.predict(real=True)
    assert bad.returncode == 2, bad.stderr
    assert "dashboard" not in bad.stderr
    # the same process on the valid workflow, planning only: imports and checks
    del project.workflow["output"]["roi"]
    baseline = project.plan(real=True)
    assert baseline.returncode == 0, baseline.stderr
    assert bad.elapsed < baseline.elapsed + 5.0, (bad.elapsed, baseline.elapsed)  # type: ignore[attr-defined]


def test_a_rejected_run_leaves_no_forkserver_behind(project: Project) -> None:
    """A local CPU run starts the forkserver its workers fork from as soon as the workflow
    is read; a check after that which rejects the workflow ends it with the command.
    Its output goes to a file: a pipe would wait for every process that holds it."""
    import re

    import psutil

    project.workflow["output"]["roi"] = {"offset": [0, 0, 0], "shape": [5, 5, 5]}
    project.workflow["cluster"]["device"] = "cpu"
    workflow = project.write_workflow()
    with open(project.root / "stderr.txt", "w") as err:
        code = subprocess.run(
            [sys.executable, "-m", "blockpredict.cli", "--debug", "predict", str(workflow)],
            cwd=project.root,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=TIMEOUT_S,
        ).returncode
    text = (project.root / "stderr.txt").read_text()
    assert code != 0 and "GeometryError" in text, text[-2000:]
    started = re.search(r"forkserver (\d+) started", text)
    assert started, text[-2000:]  # the forkserver started before the check
    assert not psutil.pid_exists(int(started.group(1)))  # and is gone with the command
    assert not project.output.exists()
