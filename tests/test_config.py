"""Workflow schema: the example file, overrides, relative paths, hints."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockpredict.config import load_workflow, validate_workflow
from blockpredict.errors import ConfigError

EXAMPLE = Path(__file__).parents[1] / "workflows" / "example.yaml"


def test_the_annotated_example_is_a_valid_workflow():
    workflow = load_workflow(EXAMPLE)
    assert workflow.model.unet is not None and workflow.model.unet.input_shape == [76, 76, 76]
    # relative paths are resolved against the workflow file's folder
    assert workflow.input.container == (EXAMPLE.parent / "../blockpredict-demo/data.zarr").resolve()
    assert workflow.execution.blocks_per_task == "auto" and workflow.execution.resume


def test_set_overrides_parse_yaml_values():
    workflow = load_workflow(
        EXAMPLE,
        [
            "cluster.n_workers=4",
            "output.roi={offset: [0, 0, 0], shape: [8, 8, 8]}",
            "model.checkpoint=null",
        ],
    )
    assert workflow.cluster.n_workers == 4
    assert workflow.output.roi is not None and workflow.output.roi.shape == [8, 8, 8]
    assert workflow.model.checkpoint is None


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"output": {"container": "o", "overwrit": True}},
            "unknown key 'output.overwrit'.*did you mean 'overwrite'",
        ),
        ({"execution": {"blocks_per_tsk": 2}}, "did you mean 'blocks_per_task'"),
        ({"cluster": {"type": "slurm", "gpus_per_jobs": 1}}, "did you mean 'gpus_per_job'"),
        ({"cluster": {"type": "local", "gpus_per_job": 2}}, "only apply to cluster types slurm"),
        (
            {"cluster": {"adapt": {"minimum": 3, "maximum": 2}, "type": "slurm"}},
            "minimum 3 exceeds maximum 2",
        ),
        (
            {"model": {"unet": {"input_shape": [8, 8]}, "head": {"out_channels": 1}, "scale": 2}},
            "belong in the unet section",
        ),
        (
            {"model": {"torchscript": "m.pt"}},
            "declare input_shape, num_in_channels, num_out_channels",
        ),
        (
            {"output": {"container": "o", "roi": {"offset": [0, 0], "shape": [1]}}},
            "offset has 2 values, shape has 1",
        ),
    ],
)
def test_bad_sections_are_one_clear_error(raw, message):
    base = {
        "input": {"container": "i", "dataset": "raw"},
        "model": {"factory": "m:f"},
        "output": {"container": "o"},
    }
    base.update(raw)
    with pytest.raises(ConfigError, match=message):
        validate_workflow(base)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            {"input": {"container": "i", "dataset": "raw", "normalize": "foo"}},
            "invalid value for input.normalize: Input should be 'auto' or 'none', or a mapping "
            "(got 'foo')",
        ),
        (
            {"input": {"container": "i", "dataset": "raw", "normalize": {"scale": "x"}}},
            "invalid value for input.normalize.scale: Input should be a valid number (got 'x')",
        ),
        (
            {"execution": {"blocks_per_task": "x"}},
            "invalid value for execution.blocks_per_task: Input should be 'auto', or an integer",
        ),
        (
            {"output": {"container": "o", "roi": 5}},
            "invalid value for output.roi: Input should be a mapping (got 5)",
        ),
    ],
)
def test_messages_name_keys_and_alternatives_not_pydantic_internals(raw, expected):
    base = {
        "input": {"container": "i", "dataset": "raw"},
        "model": {"factory": "m:f"},
        "output": {"container": "o"},
    }
    base.update(raw)
    with pytest.raises(ConfigError) as caught:
        validate_workflow(base)
    text = str(caught.value)
    assert expected in text
    assert not any(word in text for word in ("literal[", "RoiConfig", "Scaling", "constrained"))
