"""timm, Hugging Face ``transformers`` and open_clip backbones, offline: small randomly
initialised models saved locally in each library's own format, loaded, trained a step, and
refused in one line when the name or the weights do not fit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import make_folder
from mbdl.cli import main
from mbdl.models import build_backbone
from mbdl.models.backbones import weights_statistics
from mbdl.plugins import PluginError

TRAIN = [
    "data.source=folder",
    "data.image_size=32",
    "data.val_fraction=0",
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
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("family_images"), num_classes=8, per_class=4)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT saved with ``save_pretrained`` and its ``preprocessor_config.json``."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf") / "tiny-vit"
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


def test_hf_vision_encoder_loads_its_weights_and_processor(vit_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    module, dim = build_backbone(f"hf/{vit_dir}", pretrained="DEFAULT", in_channels=3)
    saved = transformers.AutoModel.from_pretrained(vit_dir)
    assert dim == 16
    torch.testing.assert_close(
        module.state_dict()["encoder.embeddings.patch_embeddings.projection.weight"],
        saved.embeddings.patch_embeddings.projection.weight,
    )
    module.eval()
    with torch.no_grad():
        images = torch.rand(2, 3, 32, 32)
        # pooled output: the model's pooler on the CLS token, as the model card's model computes
        torch.testing.assert_close(module(images), saved(pixel_values=images).pooler_output)
    stats = weights_statistics(f"hf/{vit_dir}", "DEFAULT")
    assert stats is not None
    assert (stats.mean, stats.std, stats.interpolation) == ((0.5,) * 3, (0.25,) * 3, "bicubic")
    assert weights_statistics(f"hf/{vit_dir}", None) is None  # random weights: nothing expected
    # a grey input is repeated to the three channels the encoder takes
    grey, _ = build_backbone(f"hf/{vit_dir}", pretrained="DEFAULT", in_channels=1)
    assert grey(torch.rand(2, 1, 32, 32)).shape == (2, 16)


def test_hf_backbone_trains_and_its_model_loads(
    vit_dir: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [*TRAIN, f"data.root={images}", f"model.backbone=hf/{vit_dir}"]
    assert main(["train", *args, "model.pretrained=DEFAULT", f"out={out}"]) == 0
    from mbdl.export import load_embedder, load_state

    spec = load_state(out)["preprocessing"]
    assert spec["mean"] == [0.5] * 3 and spec["interpolation"] == "bicubic"
    model, transform = load_embedder(out)
    from PIL import Image

    image = Image.new("RGB", (40, 36), (120, 30, 200))
    assert model(transform(image)[None]).shape == (1, 8)


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny open_clip architecture registered from its JSON config, random weights saved."""
    open_clip = pytest.importorskip("open_clip")
    directory = tmp_path_factory.mktemp("open_clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (directory / "mbdl-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(directory / "mbdl-tiny-clip.json"))
    model = open_clip.create_model("mbdl-tiny-clip")
    torch.save(model.state_dict(), directory / "weights.pt")
    return "mbdl-tiny-clip", directory / "weights.pt"


def test_open_clip_image_tower_loads_a_local_file(open_clip_tiny: tuple[str, Path]) -> None:
    arch, weights = open_clip_tiny
    module, dim = build_backbone(f"open_clip/{arch}", pretrained=str(weights))
    saved = torch.load(weights, weights_only=True)
    assert dim == 16
    torch.testing.assert_close(
        module.state_dict()["network.conv1.weight"], saved["visual.conv1.weight"]
    )
    stats = weights_statistics(f"open_clip/{arch}", str(weights))
    assert stats is not None and stats.interpolation == "bicubic"
    assert stats.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert stats.crop_fraction == 1.0


def test_timm_plain_state_dict_file(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", num_classes=0)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    module, _ = build_backbone("timm/test_resnet", pretrained=str(tmp_path / "w.pth"))
    key = next(iter(model.state_dict()))
    torch.testing.assert_close(module.state_dict()[key], model.state_dict()[key])
    # no config.json beside it: timm's registered pretrained_cfg for that model
    stats = weights_statistics("timm/test_resnet", str(tmp_path / "w.pth"))
    registered = timm.models.get_pretrained_cfg("test_resnet")
    assert stats is not None and stats.mean == tuple(registered.mean)


def _refused(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / "refused"
    assert main(["train", *args, f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (out / "checkpoints").exists()
    return err


def test_unknown_names_and_unfitting_weights_are_one_line(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("timm")
    data = [*TRAIN, f"data.root={images}"]
    assert "unknown timm model" in _refused(
        [*data, "model.backbone=timm/no_such_model"], tmp_path, capsys
    )
    assert "not a transformers model id or directory" in _refused(
        [*data, f"model.backbone=hf/{tmp_path / 'missing'}"], tmp_path, capsys
    )
    assert "unknown open_clip architecture" in _refused(
        [*data, "model.backbone=open_clip/no-such-arch"], tmp_path, capsys
    )
    other = {"conv.weight": torch.zeros(3, 3, 3, 3)}
    torch.save(other, tmp_path / "other.pth")
    assert "cannot load pretrained weights" in _refused(
        [*data, "model.backbone=timm/test_resnet", f"model.pretrained={tmp_path / 'other.pth'}"],
        tmp_path,
        capsys,
    )
    assert "neither DEFAULT" in _refused(
        [*data, "model.backbone=timm/test_resnet", "model.pretrained=nowhere.pth"],
        tmp_path,
        capsys,
    )


@pytest.mark.parametrize(
    ("backbone", "module", "extra"),
    [("hf/some/model", "transformers", "hf"), ("open_clip/RN50", "open_clip", "open_clip")],
)
def test_missing_library_names_the_pip_install(
    backbone: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    from mbdl.models import BACKBONES

    with pytest.raises(PluginError, match=rf"pip install 'mbdl\[{extra}\]'"):
        BACKBONES.get(backbone)


def test_timm_default_weights_are_timms_own_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.pretrained=DEFAULT`` asks timm for its hub weights (no network here: stubbed)."""
    timm = pytest.importorskip("timm")
    from mbdl.models.backbones import PretrainedWeightsError

    asked: list[bool] = []
    create = timm.create_model

    def offline(name: str, pretrained: bool = False, **options: Any) -> Any:
        asked.append(pretrained)
        if pretrained:
            raise OSError("no network\nsecond line")
        return create(name, **options)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsError, match="needs a network") as info:
        build_backbone("timm/test_resnet", pretrained="DEFAULT")
    assert asked == [True] and "\n" not in str(info.value)
    stats = weights_statistics("timm/test_resnet", "DEFAULT")  # timm's registered config
    assert stats is not None and stats.origin == "timm pretrained_cfg of test_resnet"
