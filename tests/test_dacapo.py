"""DaCapo and funlib users: their configs, checkpoints, model objects, metadata and factories.

The fixtures under tests/fixtures/dacapo were made by DaCapo 0.3.5's own code
(tests/fixtures/make_dacapo_fixtures.py; see tests/fixtures/README.md).
"""

from __future__ import annotations

import logging
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import make_input, read_output, volume_of, write_workflow
from funlib.geometry import Coordinate, Roi
from test_bad_input import Project, assert_rejected
from test_equivalence import run_case

import blockpredict
from blockpredict.build import build_model
from blockpredict.checkpoint import _DaCapoWeights
from blockpredict.config import ModelConfig, load_workflow
from blockpredict.describe import describe_plan
from blockpredict.unet_config import read_unet_config
from blockpredict.workflow import predict_workflow, prepare_workflow

FIXTURES = Path(__file__).parent / "fixtures" / "dacapo"
CONFIGS = ["iso3d", "aniso", "twod", "upsample", "transposed", "attention", "batchnorm"]
TOLERANCE = 1e-5


def dacapo_model(name: str, **extra: Any) -> dict[str, Any]:
    """A workflow's model section: DaCapo's config file and checkpoint, no head given."""
    folder = FIXTURES / name
    return {
        "unet": str(folder / "architecture.yaml"),
        "checkpoint": str(folder / "checkpoints" / "iterations" / "1"),
        "eval_activation": "sigmoid",
        **extra,
    }


def built_config(name: str, **extra: Any) -> ModelConfig:
    unet = read_unet_config(FIXTURES / name / "architecture.yaml")
    return ModelConfig.model_validate({**dacapo_model(name, **extra), "unet": unet})


def dacapo_weights(path: Path) -> Any:
    """DaCapo's pickled Weights object, read without DaCapo."""
    with torch.serialization.safe_globals([_DaCapoWeights]):
        return torch.load(path, weights_only=True, map_location="cpu")


def forward(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x[None].astype(np.float32) / 255))[0].numpy()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_and_checkpoint_give_dacapos_output(name: str) -> None:
    """Built from the config file, checkpoint loaded strictly: DaCapo's output on its input."""
    model = build_model(built_config(name))
    io = np.load(FIXTURES / name / "io.npz")
    got = forward(model, io["x"])
    assert got.shape == io["y"].shape
    assert np.abs(got - io["y"]).max() <= TOLERANCE
    assert model.num_out_channels == io["y"].shape[0]  # the head came from the checkpoint


def test_batch_norm_statistics_are_loaded() -> None:
    state = dacapo_weights(FIXTURES / "batchnorm" / "checkpoints" / "iterations" / "1").model
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert means and all(m.abs().max() > 0 for m in means)  # the fixture is not trivial


# (fixture, volume shape, voxel size, channels): 2x2(x2) blocks each
BLOCKWISE = [
    ("iso3d", (64, 64, 64), (1, 1, 1), False),
    ("aniso", (10, 48, 48), (40, 8, 8), False),
    ("twod", (2, 80, 80), (4, 4), True),
    ("upsample", (30, 30, 30), (2, 2, 2), False),
    ("transposed", (40, 40, 40), (1, 1, 1), False),
    ("batchnorm", (48, 48, 48), (1, 1, 1), False),
]


@pytest.mark.parametrize(
    "name, shape, voxel_size, channels", BLOCKWISE, ids=[b[0] for b in BLOCKWISE]
)
def test_blockwise_equals_whole_volume(
    tmp_path, cluster_address, name, shape, voxel_size, channels
) -> None:
    data = volume_of(shape)
    got, expected, plan = run_case(
        tmp_path, cluster_address, data, voxel_size, dacapo_model(name), channels=channels
    )
    assert plan.num_blocks == 2 ** len(voxel_size)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE


def test_attention_unet_equals_dacapo_block_by_block(tmp_path, cluster_address, caplog) -> None:
    """Not translation-equivariant: each block equals DaCapo on that block; plan warns."""
    blocks = np.load(FIXTURES / "attention" / "blocks.npz")
    make_input(tmp_path / "in.zarr" / "raw", blocks["x"], (1, 1, 1))
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw"},
            "model": dacapo_model("attention"),
            "output": {"container": "out.zarr", "dataset": "pred"},
            "cluster": {"type": "address", "address": cluster_address},
        },
    )
    workflow = load_workflow(path)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_workflow(workflow)
    assert "not translation-equivariant" in describe_plan(prepared)
    assert any("not translation-equivariant" in r.message for r in caplog.records)
    assert prepared.plan.num_blocks == 8
    assert predict_workflow(workflow, progress=False).exit_code == 0
    got = read_output(tmp_path / "out.zarr" / "pred")
    assert got.shape == blocks["y"].shape
    assert np.abs(got - blocks["y"]).max() <= TOLERANCE


def test_funlib_unet_state_dict_loads(tmp_path: Path) -> None:
    """unet.* keys of a funlib.learn.torch UNet (funlib's defaults) and a head."""
    config = ModelConfig.model_validate(
        {
            "unet": {
                "input_shape": [28, 28, 28],
                "fmaps_in": 1,
                "num_fmaps": 3,
                "fmaps_out": 4,
                "fmap_inc_factor": 2,
                "downsample_factors": [[2, 2, 2]],
                "constant_upsample": False,
                "activation_on_upsample": False,
                "upsample_channel_contraction": False,
            },
            "head": {"out_channels": 3},
            "checkpoint": str(FIXTURES / "funlib_unet.pt"),
        }
    )
    io = np.load(FIXTURES / "funlib_io.npz")
    got = forward(build_model(config), io["x"])
    assert np.abs(got - io["y"]).max() <= TOLERANCE


def test_dacapo_checkpoint_as_a_dict(tmp_path: Path) -> None:
    """{"model": state_dict, "optimizer": ...} as the issue describes DaCapo's file."""
    weights = dacapo_weights(FIXTURES / "iso3d" / "checkpoints" / "iterations" / "1")
    assert "chain.0.unet.l_conv.0.conv_pass.0.weight" in weights.model  # DaCapo's duplicates
    torch.save({"model": weights.model, "optimizer": weights.optimizer}, tmp_path / "7")
    model = build_model(built_config("iso3d", checkpoint=tmp_path / "7"))
    io = np.load(FIXTURES / "iso3d" / "io.npz")
    assert np.abs(forward(model, io["x"]) - io["y"]).max() <= TOLERANCE


class DuckModel:
    """The seed's Model API without subclassing blockpredict.Model (nor nn.Module)."""

    def __init__(self, model: Any) -> None:
        self.inner = model
        self.input_shape = model.input_shape
        self.eval_input_shape = model.eval_input_shape
        self.num_in_channels = model.num_in_channels
        self.num_out_channels = model.num_out_channels
        self.output_shape = model.output_shape

    def compute_output_shape(self, input_shape: Coordinate) -> tuple[int, Coordinate]:
        return self.inner.compute_output_shape(input_shape)

    def scale(self, voxel_size: Coordinate) -> Coordinate:
        return self.inner.scale(voxel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_duck_typed_model_predicts(tmp_path, cluster_address) -> None:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    try:
        model = build_model(built_config("iso3d"))
        duck = DuckModel(model)
        assert not isinstance(duck, (blockpredict.Model, torch.nn.Module))
        data = volume_of((64, 64, 64))
        make_input(tmp_path / "in.zarr" / "raw", data, (1, 1, 1))
        report = blockpredict.predict(
            duck,
            input={"container": str(tmp_path / "in.zarr"), "dataset": "raw"},
            output={"container": str(tmp_path / "out.zarr"), "dataset": "pred"},
            cluster={"type": "address", "address": cluster_address},
            progress=False,
        )
        assert report.exit_code == 0
        got = read_output(tmp_path / "out.zarr" / "pred")
        with torch.no_grad():
            whole = model(torch.from_numpy(data[None, None].astype(np.float32) / 255))[0].numpy()
        assert got.shape == whole.shape
        assert np.abs(got - whole).max() <= TOLERANCE
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_object_without_the_api_is_refused(tmp_path) -> None:
    with pytest.raises(
        blockpredict.errors.ModelError,
        match="Conv3d is not a Model .it lacks input_shape, eval_input_shape.*wrap it",
    ):
        blockpredict.predict(
            torch.nn.Conv3d(1, 1, 1),
            input={"container": str(tmp_path / "in.zarr"), "dataset": "raw"},
            output={"container": str(tmp_path / "out.zarr"), "dataset": "pred"},
        )


# --- metadata ---------------------------------------------------------------

SMALL_UNET = {"input_shape": [20, 20, 20], "num_fmaps": 2, "downsample_factors": [[2, 2, 2]]}


def gunpowder_input(path: Path, attrs: dict[str, Any]) -> None:
    """A zarr v2 array as gunpowder/daisy wrote them: resolution and offset attributes."""
    array = zarr.create_array(
        str(path), shape=(24, 40, 40), chunks=(8, 8, 8), dtype="uint8", zarr_format=2
    )
    array[:] = volume_of((24, 40, 40))
    array.attrs.update(attrs)


def plan_of(tmp_path: Path, input_extra: dict[str, Any] | None = None):
    path = write_workflow(
        tmp_path / "workflow.yaml",
        {
            "input": {"container": "in.zarr", "dataset": "raw", **(input_extra or {})},
            "model": {"unet": SMALL_UNET, "head": {"out_channels": 1}},
            "output": {"container": "out.zarr", "dataset": "pred"},
        },
    )
    return prepare_workflow(load_workflow(path))


def test_resolution_metadata_sets_the_voxel_size(tmp_path, caplog) -> None:
    gunpowder_input(tmp_path / "in.zarr" / "raw", {"resolution": [40, 8, 8], "offset": [400, 0, 0]})
    with caplog.at_level(logging.WARNING, logger="blockpredict"):
        prepared = plan_of(tmp_path)
    assert prepared.plan.input_voxel_size == Coordinate(40, 8, 8)
    assert prepared.input.roi == Roi((400, 0, 0), (24 * 40, 40 * 8, 40 * 8))
    text = describe_plan(prepared)
    assert "(40, 8, 8) from metadata 'resolution'" in text
    assert "(400, 0, 0) from metadata 'offset'" in text
    assert not [r for r in caplog.records if "voxel" in r.message]


def test_overrides_win_and_warn(tmp_path, caplog) -> None:
    gunpowder_input(tmp_path / "in.zarr" / "raw", {"resolution": [40, 8, 8], "offset": [400, 0, 0]})
    with caplog.at_level(logging.WARNING, logger="blockpredict"):
        prepared = plan_of(tmp_path, {"voxel_size": [40, 4, 4], "offset": [800, 0, 0]})
    assert prepared.plan.input_voxel_size == Coordinate(40, 4, 4)
    assert prepared.input.roi.offset == Coordinate(800, 0, 0)
    messages = " ".join(r.message for r in caplog.records)
    assert "input.voxel_size (40, 4, 4) overrides the metadata's resolution (40, 8, 8)" in messages
    assert "input.offset (800, 0, 0) overrides the metadata's offset (400, 0, 0)" in messages
    assert "from input.voxel_size" in describe_plan(prepared)


def test_no_voxel_size_warns(tmp_path, caplog) -> None:
    gunpowder_input(tmp_path / "in.zarr" / "raw", {})
    with caplog.at_level(logging.WARNING, logger="blockpredict"):
        prepared = plan_of(tmp_path)
    assert prepared.plan.input_voxel_size == Coordinate(1, 1, 1)
    assert any("assuming (1, 1, 1)" in r.message for r in caplog.records)
    assert "warning:" in describe_plan(prepared) and "assumed" in describe_plan(prepared)


# --- factories beside the workflow -------------------------------------------

FACTORY = """
import torch
from blockpredict.architectures import CNNectomeUNet
from blockpredict.model import Model

def make():
    torch.manual_seed(5)
    unet = CNNectomeUNet([20, 20, 20], 2, 1, 2, 2, [[2, 2, 2]])
    return Model(unet, torch.nn.Conv3d(2, 1, 1))
"""


def test_factory_beside_the_workflow_imports_on_workers(tmp_path, cluster_address) -> None:
    """No PYTHONPATH: the running workers import the module from the workflow's folder."""
    module = f"mymodels_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(FACTORY)
    data = volume_of((28, 28, 28))
    try:
        got, expected, plan = run_case(
            tmp_path, cluster_address, data, (1, 1, 1), {"factory": f"{module}:make"}
        )
        assert np.abs(got - expected).max() <= TOLERANCE
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)


# --- bad input --------------------------------------------------------------


def _file_case(p: Project, text: str | None) -> None:
    target = p.root / "arch.yaml"
    if text is None:
        target.mkdir()
    else:
        target.write_text(text)
    p.workflow["model"]["unet"] = "arch.yaml"


def unet_file_missing(p: Project):
    p.workflow["model"]["unet"] = "configs/architectures/nope.yaml"
    return ["architecture config file not found", "nope.yaml"]


def unet_file_unreadable(p: Project):
    _file_case(p, None)  # a folder
    return ["cannot read architecture config file (IsADirectoryError)", "arch.yaml"]


def unet_file_not_a_mapping(p: Project):
    _file_case(p, "- 1\n- 2\n")
    return ["architecture config must be a mapping, got list", "arch.yaml"]


def unet_file_unknown_type(p: Project):
    _file_case(p, "__type__: DummyArchitectureConfig\nname: x\ninput_shape: [20, 20, 20]\n")
    return ["unknown __type__ 'DummyArchitectureConfig'", "supported: CNNectomeUNetConfig"]


def unet_file_unknown_key(p: Project):
    _file_case(p, yaml.safe_dump({**p.workflow["model"]["unet"], "num_fmap": 2}))
    return ["unknown key 'num_fmap'", "did you mean 'num_fmaps'?", "arch.yaml"]


def unet_inline_unknown_key(p: Project):
    p.workflow["model"]["unet"]["constant_upsampl"] = False
    return ["unknown key 'model.unet.constant_upsampl'", "did you mean 'constant_upsample'?"]


def checkpoint_of_another_configuration(p: Project):
    shutil.copy(FIXTURES / "iso3d" / "checkpoints" / "iterations" / "1", p.root / "1")
    p.workflow["model"]["checkpoint"] = "1"
    return [
        "checkpoint does not match the model",
        "unexpected keys: architecture.unet.l_conv.2.conv_pass.0.weight (8, 4, 3, 3, 3)",
        "shapes differ: architecture.unet.r_conv.0.0.conv_pass.0.weight is (3, 6, 3, 3, 3) "
        "in the checkpoint, (2, 6, 3, 3, 3) in the model",
    ]


CASES = [
    unet_file_missing,
    unet_file_unreadable,
    unet_file_not_a_mapping,
    unet_file_unknown_type,
    unet_file_unknown_key,
    unet_inline_unknown_key,
    checkpoint_of_another_configuration,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_dacapo_input_is_one_line(tmp_path: Path, case) -> None:
    project = Project(tmp_path)
    phrases = case(project)
    assert_rejected(project.plan(), project, *phrases)


def test_json_config_file_equals_yaml(tmp_path: Path) -> None:
    import json

    raw = yaml.load(
        (FIXTURES / "aniso" / "architecture.yaml").read_text(), Loader=yaml.UnsafeLoader
    )
    (tmp_path / "aniso.json").write_text(json.dumps(raw))  # tuples become lists
    from_json = read_unet_config(tmp_path / "aniso.json")
    assert from_json == read_unet_config(FIXTURES / "aniso" / "architecture.yaml")
    assert from_json.kernel_size_down == [[[1, 3, 3], [1, 3, 3]]] * 2 + [[[3, 3, 3]] * 2]
