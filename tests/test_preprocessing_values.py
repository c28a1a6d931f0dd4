"""One preprocessing record per model, from where its weights come from, used by every path.

A timm model saved locally in timm's hub layout, whose ``pretrained_cfg`` says mean = std = 0.5,
bicubic and crop_pct 0.9 (not ImageNet's statistics), gets those values in the training
transform, the evaluation transform, the checkpoint, the model directory's preprocessing.json,
``load_embedder``'s transform and the ONNX sidecar; ``data.*`` keys override them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision import transforms as T

from fixtures_data import make_folder
from mbdl.cli import main
from mbdl.config import ConfigError, load_config
from mbdl.model.preprocessing import (
    IMAGENET,
    PreprocessingError,
    check_spec,
    config_statistics,
    preprocessing_spec,
    transform_from_spec,
)

timm = pytest.importorskip("timm")

CUSTOM_CFG = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "input_size": [3, 32, 32],
}


def save_timm_dir(directory: Path, architecture: str = "test_resnet") -> Path:
    """A randomly initialised timm model in timm's hub layout (config.json + model.safetensors)
    with a custom pretrained_cfg."""
    from safetensors.torch import save_file

    model = timm.create_model(architecture, num_classes=0)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors"
    )
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "pretrained_cfg": CUSTOM_CFG,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def steps(transform: Any, kind: type) -> list[Any]:
    return [step for step in transform.transforms if isinstance(step, kind)]


def assert_custom(transform: Any, *, train: bool) -> None:
    (normalize,) = steps(transform, T.Normalize)
    assert list(normalize.mean) == [0.5, 0.5, 0.5] and list(normalize.std) == [0.5, 0.5, 0.5]
    resizing = steps(transform, T.RandomResizedCrop) if train else steps(transform, T.Resize)
    assert resizing and resizing[0].interpolation == T.InterpolationMode.BICUBIC
    if not train:
        assert resizing[0].size == 36  # round(32 / 0.9)


def assert_custom_spec(spec: dict[str, Any]) -> None:
    assert spec["mean"] == [0.5, 0.5, 0.5] and spec["std"] == [0.5, 0.5, 0.5]
    assert spec["interpolation"] == "bicubic"
    assert (spec["resize"], spec["crop"]) == (36, 32)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("timm_stats")
    weights = save_timm_dir(base / "weights")
    data = make_folder(base / "images", num_classes=8, per_class=4)
    out = base / "run"
    overrides = [
        "data.source=folder",
        f"data.root={data}",
        "data.image_size=32",
        "data.augment=crop",
        "data.val_fraction=0",
        "model.backbone=timm/test_resnet",
        f"model.pretrained={weights}",
        "model.embedding_dim=8",
        "train.epochs=1",
        "train.batch_classes=4",
        "train.batch_per_class=2",
        "train.max_steps_per_epoch=1",
        "train.device=cpu",
        "train.num_threads=1",
        "train.progress=false",
        "eval.ks=[1]",
        "eval.report=false",
        f"out={out}",
    ]
    from mbdl.train.trainer import Trainer

    config = load_config(None, overrides)
    trainer = Trainer(config)
    try:
        transforms = {
            "train": trainer.splits.train.transform,
            "test": trainer.splits.test.transform,
        }
    finally:
        trainer.close()
    assert main(["train", *overrides, "resume=false", f"out={base / 'run2'}"]) == 0
    return {"base": base, "weights": weights, "run": base / "run2", "transforms": transforms}


def test_timm_pretrained_cfg_reaches_every_path(timm_run: dict[str, Any]) -> None:
    from mbdl.export import load_embedder, save_pretrained, sidecar_path
    from mbdl.train.checkpoint import load_checkpoint

    assert_custom(timm_run["transforms"]["train"], train=True)
    assert_custom(timm_run["transforms"]["test"], train=False)

    run = timm_run["run"]
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    assert_custom_spec(state["preprocessing"])

    model_dir = save_pretrained(run, timm_run["base"] / "model")
    assert_custom_spec(json.loads((model_dir / "preprocessing.json").read_text()))
    _, transform = load_embedder(model_dir)
    assert_custom(transform, train=False)
    _, transform = load_embedder(run)
    assert_custom(transform, train=False)

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    output = timm_run["base"] / "embedder.onnx"
    assert main(["export", str(run), "--format", "onnx", "-o", str(output)]) == 0
    assert_custom_spec(json.loads(sidecar_path(output).read_text())["preprocessing"])


def test_statistics_from_the_weights_and_overrides(timm_run: dict[str, Any]) -> None:
    weights = timm_run["weights"]
    base = ["model.backbone=timm/test_resnet", f"model.pretrained={weights}"]
    found = config_statistics(load_config(None, base))
    assert (found.mean, found.interpolation, found.crop_fraction) == (
        (0.5, 0.5, 0.5),
        "bicubic",
        0.9,
    )
    # random weights expect nothing; the data keys override what the weights say
    assert config_statistics(load_config(None, base[:1])).std == (1.0, 1.0, 1.0)
    forced = config_statistics(
        load_config(
            None,
            [
                *base,
                f"data.mean={list(IMAGENET.mean)}",
                f"data.std={list(IMAGENET.std)}",
                "data.interpolation=bilinear",
                "data.crop_fraction=0.875",
            ],
        )
    )
    assert (forced.mean, forced.std, forced.interpolation, forced.crop_fraction) == (
        IMAGENET.mean,
        IMAGENET.std,
        "bilinear",
        0.875,
    )
    # torchvision weight names: the weights' own transforms (no download needed)
    mobilenet = config_statistics(
        load_config(None, ["model.backbone=mobilenet_v2", "model.pretrained=IMAGENET1K_V2"])
    )
    assert mobilenet.crop_fraction == pytest.approx(224 / 232)
    assert mobilenet.mean == IMAGENET.mean


def test_timm_weights_of_another_architecture_are_refused(timm_run: dict[str, Any]) -> None:
    from mbdl.models import build_backbone

    with pytest.raises(Exception, match="holds weights of 'test_resnet', not 'test_vit'"):
        build_backbone("timm/test_vit", pretrained=str(timm_run["weights"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.mean=[0.5, 0.5]", "one value per channel"),
        ("data.std=[0.2, 0, 0.2]", "must be > 0"),
        ("data.mean=[.nan, 0, 0]", "finite"),
        ("data.interpolation=cubic", "not allowed"),
        ("data.crop_fraction=0", "must be > 0"),
        ("data.crop_fraction=1.2", "must be <= 1"),
    ],
)
def test_bad_statistics_are_one_line_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_mean_of_the_wrong_channel_count_is_refused_before_training(tmp_path: Path) -> None:
    code = main(
        [
            "train",
            "data.mean=[0.5, 0.5, 0.5]",  # glyphs are grey: one channel
            "data.std=[0.5]",
            f"out={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_old_specs_still_load_bilinear_and_damaged_ones_are_refused() -> None:
    spec = preprocessing_spec(64, 3, True)
    old = {k: v for k, v in spec.items() if k not in ("interpolation", "crop_fraction")}
    (resize,) = steps(transform_from_spec(old), T.Resize)
    assert resize.interpolation == T.InterpolationMode.BILINEAR and resize.size == 73
    for damaged in (
        {**spec, "std": [0.2, 0.0, 0.2]},
        {**spec, "mean": [0.5]},
        {**spec, "interpolation": "fancy"},
        {**spec, "resize": -1},
    ):
        with pytest.raises(PreprocessingError):
            check_spec(damaged)


def test_the_stored_spec_drives_the_transform() -> None:
    spec = preprocessing_spec(32, 3, statistics=config_statistics(load_config(None, [])))
    assert spec["mean"] == [0.0, 0.0, 0.0]
    image = torch.rand(3, 40, 40)
    from torchvision.transforms.functional import to_pil_image

    out = transform_from_spec({**spec, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})(
        to_pil_image(image)
    )
    plain = transform_from_spec(spec)(to_pil_image(image))
    torch.testing.assert_close(out, (plain - 0.5) / 0.5)
