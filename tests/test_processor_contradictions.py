"""A model's preprocessing from its library's config (here a Hugging Face image processor)
against the ``data.*`` keys: overrides are applied, named on the data line and stored; what
cannot be intended (a mean per channel of other images, 0-255 statistics, an input side the
model cannot take) is refused in one line, exit 2, before training."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from fixtures_data import TINY_GLYPH_RUN, make_folder
from mbdl.cli import main

TRAIN = [
    "data.source=folder",
    "data.val_fraction=0",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.batch_classes=4",
    "train.batch_per_class=2",
    "train.max_steps_per_epoch=1",
    "train.device=cpu",
    "train.num_threads=1",
    "eval.ks=[1]",
    "eval.report=false",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("contradiction_images"), num_classes=8, per_class=4)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT (32 px, fixed position embeddings) and its image processor config
    (mean 0.5, std 0.25, bicubic)."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_contradiction") / "tiny-vit"
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.ViTModel(config).save_pretrained(directory)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        resample=3,
    ).save_pretrained(directory)
    return directory


def _train(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", *args])
    return code, err.getvalue()


def _refused(code: int, err: str, message: str, out: Path) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (out / "checkpoints").exists()


def test_override_of_the_processor_is_named_on_the_data_line_and_stored(
    vit_dir: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, err = _train(
        *TRAIN,
        f"data.root={images}",
        "data.image_size=32",
        f"model.backbone=hf/{vit_dir}",
        "model.pretrained=DEFAULT",
        "data.mean=[0.4, 0.4, 0.4]",
        "data.std=[0.2, 0.2, 0.2]",
        "data.interpolation=bilinear",
        "train.progress=true",
        f"out={out}",
    )
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if line.startswith("data folder: ")]
    assert f"preprocessing: image processor of {vit_dir}; overridden: " in line
    assert "data.mean [0.4, 0.4, 0.4] (was [0.5, 0.5, 0.5])" in line
    assert "data.std [0.2, 0.2, 0.2] (was [0.25, 0.25, 0.25])" in line
    assert "data.interpolation bilinear (was bicubic)" in line
    from mbdl.export import load_state

    spec = load_state(out)["preprocessing"]
    assert spec["mean"] == pytest.approx([0.4] * 3) and spec["std"] == pytest.approx([0.2] * 3)
    assert spec["interpolation"] == "bilinear"
    assert spec["statistics_from"].startswith(f"image processor of {vit_dir}; overridden: data.")


def test_an_input_side_a_vit_cannot_take_is_refused(
    vit_dir: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, err = _train(
        *TRAIN,
        f"data.root={images}",
        "data.image_size=48",
        f"model.backbone=hf/{vit_dir}",
        "model.pretrained=DEFAULT",
        "train.progress=false",
        f"out={out}",
    )
    _refused(code, err, f"model.backbone=hf/{vit_dir} cannot take 48 x 48 px images", out)
    assert "its input size is 32 px: set data.image_size=32" in err


def test_a_mean_per_channel_of_other_images_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, err = _train(
        *TINY_GLYPH_RUN,  # glyphs are grey: one channel, so three values cannot be meant
        "data.mean=[0.5, 0.5, 0.5]",
        "data.std=[0.25, 0.25, 0.25]",
        f"out={out}",
    )
    _refused(code, err, "data.mean has 3 value(s) but the images of data.source=glyphs have 1", out)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            ["data.mean=[123.675, 116.28, 103.53]", "data.std=[0.2, 0.2, 0.2]"],
            "on the 0-255 scale, divide by 255: data.mean=[0.485, 0.456, 0.406]",
        ),
        (["data.mean=[0.5]", "data.std=[58.4]"], "data.std=[58.4] does not fit images scaled"),
        (["data.mean=[-0.5]"], "data.mean=[-0.5] does not fit images scaled to [0, 1]"),
    ],
)
def test_statistics_on_another_scale_are_refused(
    keys: list[str], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, err = _train(*TINY_GLYPH_RUN, *keys, f"out={out}")
    _refused(code, err, message, out)
