"""Data sources and backbones declared once, as registries: user plugins by import path and by
entry point (the example plugins of tests/example_plugins.py, documented in docs/plugins.md),
validated before training with one-line errors, and trained end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import example_plugins
from mbdl.config import ConfigError, load_config
from mbdl.data import SOURCES, Splits, load_splits
from mbdl.models import (
    BACKBONES,
    BUILTIN_BACKBONES,
    PretrainedWeightsError,
    build_backbone,
    build_model,
    native_input_size,
)
from mbdl.models.backbones import backbones_fitting
from mbdl.plugins import PluginError
from mbdl.train import train
from mbdl.train.checkpoint import load_checkpoint, model_from_checkpoint

SOURCE = "example_plugins:load_splits"
BACKBONE = "example_plugins:build"


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, code: str) -> str:
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: str, value: str) -> None:
    """An installed distribution declaring the entry point ``example = value`` in ``group``."""
    info = tmp_path / "example_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: example-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\nexample = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# data sources


def test_source_plugin_by_import_path() -> None:
    config = load_config(None, [f"data.source={SOURCE}"])  # no data.root needed
    assert config.data.source == SOURCE
    splits = load_splits(SOURCE, image_size=24, val_fraction=0.2, seed=1)
    assert isinstance(splits, Splits) and splits.channels == 1
    assert splits.test.num_classes == 4 and splits.train.num_classes + splits.val.num_classes == 6
    image, label = splits.train[0]
    assert image.shape == (1, 24, 24) and 0 <= label < splits.train.num_classes


def test_source_plugin_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_point(tmp_path, monkeypatch, "mbdl.sources", SOURCE)
    assert "example" in SOURCES.names()
    assert load_config(None, ["data.source=example"]).data.source == "example"
    assert load_splits("example", image_size=16).test.num_classes == 4


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("load = 3\n", "data source 'bad_source:load' is a int, not a function"),
        ("def load(root):\n    pass\n", "cannot be called as (root, *, image_size, val_fraction"),
        (
            "def load(root, *, image_size, val_fraction, seed, labels):\n    pass\n",
            "missing a required argument: 'labels'",
        ),
    ],
)
def test_bad_source_plugins_are_refused_by_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, message: str
) -> None:
    _module(tmp_path, monkeypatch, "bad_source", code)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.source=bad_source:load"])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("data.source: ")


def test_missing_source_module_is_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"data.source: .*cannot import module 'no_such_pkg_x.data'"
    ):
        load_config(None, ["data.source=no_such_pkg_x.data:load"])


def test_source_result_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(
        tmp_path,
        monkeypatch,
        "odd_source",
        "def load(root, *, image_size, val_fraction, seed):\n    return [1, 2]\n",
    )
    with pytest.raises(PluginError, match=r"returned a list, not mbdl.data.Splits"):
        load_splits("odd_source:load", image_size=16)


# ---------------------------------------------------------------------------------------------
# backbones


@pytest.mark.parametrize("name", BACKBONES.builtin_names())
def test_every_builtin_backbone_is_declared_and_builds_grey_and_colour(name: str) -> None:
    """Built on the meta device (shapes only, no memory or time): the declared classifier is
    gone, the first convolution takes the asked channels, the features have the declared size."""
    assert name in BACKBONES and 8 <= native_input_size(name) <= 4096
    for channels in (1, 3):
        with torch.device("meta"):
            module, dim = build_backbone(name, in_channels=channels)
            features = module(torch.empty(2, channels, 64, 64))
        assert features.shape == (2, dim), (name, channels)
        first = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == channels, name
        assert not any(
            isinstance(m, nn.Linear) and m.out_features == 1000 for m in module.modules()
        )


def test_convnext_keeps_its_layernorm_and_gives_768_features() -> None:
    import torchvision

    torch.manual_seed(0)
    with torch.device("meta"):  # built without its slow initialisation, then filled at random
        module, dim = build_backbone("convnext_tiny")
    module.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.normal_(0.0, 0.1)
    assert dim == 768
    assert isinstance(module.classifier[0], torchvision.models.convnext.LayerNorm2d)
    assert isinstance(module.classifier[2], nn.Identity)
    # the features are the LayerNorm of the pooled last stage, as torchvision's classifier sees them
    module.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = module.avgpool(module.features(images))
        expected = module.classifier[0](pooled).flatten(1)
        torch.testing.assert_close(module(images), expected)
        assert not torch.allclose(pooled.flatten(1), expected)


def test_weights_of_each_builtin_torchvision_network_fit_only_the_stripped_classifier() -> None:
    """A full torchvision state_dict (classifier included) fits its backbone: only the replaced
    layer's keys are ignored (ConvNeXt's classifier.0 LayerNorm is loaded, not dropped)."""
    for name, entry in BUILTIN_BACKBONES.items():
        if not entry.hub_weights:
            continue
        with torch.device("meta"):
            state = entry.network(3, False).state_dict()  # the whole network, classifier included
        assert name in backbones_fitting(state), name
    convnext = BUILTIN_BACKBONES["convnext_tiny"].classifier_prefixes()
    assert convnext == ("classifier.2.",)


def test_backbone_plugin_by_import_path_and_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_config(None, [f"model.backbone={BACKBONE}"]).model.backbone == BACKBONE
    module, dim = build_backbone(BACKBONE, in_channels=1)
    assert dim == 16 and module(torch.randn(2, 1, 32, 32)).shape == (2, 16)
    model = build_model(BACKBONE, 8, in_channels=3)
    assert model.eval()(torch.randn(2, 3, 40, 40)).shape == (2, 8)
    from mbdl.data import auto_image_size

    assert auto_image_size(500, BACKBONE) == example_plugins.build.native_size
    _entry_point(tmp_path, monkeypatch, "mbdl.backbones", BACKBONE)
    assert build_backbone("example")[1] == 16


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("build = 'resnet'\n", "is a str, not a function (pretrained, in_channels)"),
        (
            "def build(weights):\n    pass\n",
            "cannot be called as build(pretrained=..., in_channels",
        ),
    ],
)
def test_bad_backbone_plugins_are_refused_by_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, message: str
) -> None:
    _module(tmp_path, monkeypatch, "bad_backbone", code)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.backbone=bad_backbone:build"])
    assert message in str(info.value) and str(info.value).startswith("model.backbone: ")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("return nn.Linear(3, 4)", "returned a Linear, not (nn.Module, feature_dim)"),
        ("return 'net', 4", "built a str, not a torch nn.Module"),
        ("return nn.Flatten(), 0", "feature_dim must be a positive int; got 0"),
        ("return nn.Flatten(), 4", "maps a [2, 3, 32, 32] input to (2, 3072), not features [2, 4]"),
        ("return nn.Linear(5, 4), 4", "fails on a [2, 3, 32, 32] input"),
        ("raise ValueError('no such depth')", "failed to build: no such depth"),
    ],
)
def test_backbone_plugin_output_is_checked_on_a_small_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str
) -> None:
    code = (
        "from torch import nn\n\n"
        f"def build(pretrained, in_channels):\n    {body}\n\nbuild.native_size = 32\n"
    )
    _module(tmp_path, monkeypatch, "odd_backbone", code)
    with pytest.raises(PluginError) as info:
        build_backbone("odd_backbone:build")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_backbone_names_every_kind_of_choice() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.backbone=vgg"])
    message = str(info.value)
    assert "smallvgg" in message and "timm/<name>" in message and "package.module:" in message


# ---------------------------------------------------------------------------------------------
# end to end


def test_train_and_reload_with_plugin_source_and_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            f"data.source={SOURCE}",
            f"model.backbone={BACKBONE}",
            "data.image_size=16",
            "data.val_fraction=0.34",
            "model.embedding_dim=8",
            "train.epochs=1",
            "train.warmup_epochs=0",
            "train.batch_classes=2",
            "train.batch_per_class=4",
            "train.max_steps_per_epoch=2",
            "train.progress=false",
            "train.device=cpu",
            "train.num_threads=1",
            "eval.ks=[1]",
            "eval.report=false",
            f"out={out}",
        ],
    )
    metrics = train(config)
    assert 0.0 <= metrics["test"]["map@r"] <= 1.0
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    assert state["model_args"]["backbone"] == BACKBONE
    with pytest.raises(PluginError, match=r"model.backbone=.* names code to import and run"):
        model_from_checkpoint(out / "checkpoints" / "best.pt")  # a file could name any code
    monkeypatch.setenv("MBDL_TRUST_PLUGINS", "1")
    model = model_from_checkpoint(out / "checkpoints" / "best.pt")
    assert model.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 8)


# ---------------------------------------------------------------------------------------------
# timm (optional extra: pip install 'mbdl[timm]'); offline, random weights


def test_timm_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError, match=r"model.backbone: .*pip install 'mbdl\[timm\]'"):
        load_config(None, ["model.backbone=timm/resnet18"])


def test_timm_backbone_builds_grey_and_colour_without_its_classifier() -> None:
    pytest.importorskip("timm")
    assert load_config(None, ["model.backbone=timm/test_resnet"]).model.backbone == (
        "timm/test_resnet"
    )
    for channels in (1, 3):
        module, dim = build_backbone("timm/test_resnet", in_channels=channels)
        module.eval()
        with torch.no_grad():
            assert module(torch.randn(2, channels, 48, 48)).shape == (2, dim)
        assert dim == module.num_features and module.num_classes == 0
    model = build_model("timm/test_resnet", 8, in_channels=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.randn(2, 1, 48, 48)).norm(dim=1), torch.ones(2))
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_net'"):
        load_config(None, ["model.backbone=timm/no_such_net"])


def test_timm_pretrained_is_a_local_file_or_a_clear_error(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    reference = timm.create_model("test_resnet", num_classes=7)  # its classifier differs
    path = tmp_path / "test_resnet.pth"
    torch.save(reference.state_dict(), path)
    module, _ = build_backbone("timm/test_resnet", pretrained=str(path))
    for key, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[key], rtol=0, atol=0)
    grey, _ = build_backbone("timm/test_resnet", pretrained=path, in_channels=1)
    first = reference.pretrained_cfg["first_conv"] + ".weight"
    torch.testing.assert_close(
        grey.state_dict()[first], reference.state_dict()[first].sum(dim=1, keepdim=True)
    )
    for name in ("IMAGENET1K_V1", str(tmp_path / "missing.pth")):
        with pytest.raises(PretrainedWeightsError) as info:
            build_backbone("timm/test_resnet", pretrained=name)
        message = str(info.value)
        assert "needs a network" in message and "model.pretrained=PATH" in message
        assert "\n" not in message
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(PretrainedWeightsError, match="cannot load pretrained weights"):
        build_backbone("timm/test_resnet", pretrained=tmp_path / "junk.pth")


def test_the_documented_plugins_are_the_tested_ones() -> None:
    """Every code block of docs/sources-and-backbones.md is a verbatim part of the example
    plugins that this file trains, so the documentation cannot drift from working code."""
    import re

    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "sources-and-backbones.md").read_text(encoding="utf-8")
    example = Path(example_plugins.__file__).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        assert block in example
