"""The shipped configuration files: every YAML under configs/ validates, and the literature
configurations (CUB-200-2011, Cars196, SOP x GoogLeNet-64 / ResNet-50-512) follow the protocol
their comments and docs/literature.md describe. Config loading only: no data, weights or training.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from torchvision.models import get_model_weights

from mbdl.config import (
    LOSS_NAMES,
    Config,
    config_to_dict,
    config_to_yaml,
    load_config,
    loss_parameters,
    read_yaml_config,
)
from mbdl.data import cars, cub
from mbdl.data.splits import carve_validation_classes

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
LITERATURE_DOC = ROOT / "docs" / "literature.md"
ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
FAKE_ROOT = "data.root=/nonexistent/only-validated-not-read"

# file name -> (source, backbone, embedding size)
LITERATURE = {
    "cub_googlenet_64.yaml": ("cub", "googlenet", 64),
    "cub_resnet50_512.yaml": ("cub", "resnet50", 512),
    "cars_googlenet_64.yaml": ("cars", "googlenet", 64),
    "cars_resnet50_512.yaml": ("cars", "resnet50", 512),
    "sop_googlenet_64.yaml": ("sop", "googlenet", 64),
    "sop_resnet50_512.yaml": ("sop", "resnet50", 512),
}
COMPARE_LOSSES = "mdl,triplet,contrastive,lifted,npair,margin,multisimilarity,proxyanchor"
TRAIN_CLASSES = {"cub": len(cub.TRAIN_CLASS_IDS), "cars": len(cars.TRAIN_CLASS_IDS)}


def _overrides(path: Path) -> list[str]:
    """``data.root`` for sources that need one (validation only checks it is given)."""
    source = read_yaml_config(path).get("data.source", "glyphs")
    return [] if source == "glyphs" else [FAKE_ROOT]


def _literature(name: str, extra: list[str] | None = None) -> Config:
    return load_config(CONFIGS / name, [FAKE_ROOT, *(extra or [])])


def test_literature_configs_are_shipped() -> None:
    assert set(LITERATURE) <= {p.name for p in ALL_CONFIGS}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_validates_and_round_trips(path: Path, tmp_path: Path) -> None:
    config = load_config(path, _overrides(path))
    assert isinstance(config, Config)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(config_to_yaml(config), encoding="utf-8")
    assert config_to_dict(load_config(resolved)) == config_to_dict(config)


@pytest.mark.parametrize("name", sorted(LITERATURE))
def test_literature_config_follows_the_protocol(name: str) -> None:
    source, backbone, dim = LITERATURE[name]
    config = _literature(name)
    assert config.data.source == source
    assert config.data.image_size == 224
    assert config.data.augment == "crop"  # RandomResizedCrop(224) + horizontal flip
    assert config.data.bbox is False
    assert 0 < config.data.val_fraction < 0.5  # model selection on carved-out training classes
    assert config.model.backbone == backbone and config.model.embedding_dim == dim
    assert config.model.pretrained in ("IMAGENET1K_V1", "DEFAULT")
    assert config.model.freeze_bn is True
    assert config.train.batch_classes * config.train.batch_per_class == 128
    assert config.train.batch_per_class >= 2 and config.train.batch_classes >= 2
    assert config.train.optimizer == "adamw"
    assert 1e-5 <= config.train.lr <= 1e-4
    assert config.train.head_lr_mult > 1
    assert config.train.device == "cuda"
    assert config.train.amp in ("bf16", "fp16")
    assert config.train.select_metric == "map@r"
    assert config.train.patience is None  # a fixed epoch budget, the same for every loss
    low, high = (30, 60) if source == "sop" else (50, 100)
    assert low <= config.train.epochs <= high
    expected_ks = [1, 10, 100, 1000] if source == "sop" else [1, 2, 4, 8]
    assert config.eval.ks == expected_ks
    assert config.loss.name == "mdl"
    defaults = {p: d for p, d in loss_parameters("mdl").items() if d is not inspect.Parameter.empty}
    assert config.loss.params == defaults  # no loss-specific keys: the loss switches by override


@pytest.mark.parametrize("name", sorted(LITERATURE))
def test_literature_config_weights_are_torchvision_imagenet_weights(name: str) -> None:
    config = _literature(name)
    weights = get_model_weights(config.model.backbone)[str(config.model.pretrained)]
    categories = weights.meta["categories"]
    assert len(categories) == 1000 and categories[0] == "tench"  # the ImageNet-1k classes


@pytest.mark.parametrize("name", [n for n in sorted(LITERATURE) if LITERATURE[n][0] != "sop"])
def test_literature_batch_fits_the_training_classes(name: str) -> None:
    config = _literature(name)
    num_classes = TRAIN_CLASSES[config.data.source]
    train_idx, val_idx = carve_validation_classes(
        np.arange(num_classes), config.data.val_fraction, config.seed
    )
    assert len(val_idx) >= 10  # enough validation classes to select a checkpoint on
    assert config.train.batch_classes <= len(train_idx)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("name", sorted(LITERATURE))
def test_switching_the_loss_by_override(name: str, loss: str) -> None:
    config = _literature(name, [f"loss.name={loss}"])
    assert config.loss.name == loss
    expected = {p: d for p, d in loss_parameters(loss).items() if d is not inspect.Parameter.empty}
    assert config.loss.params == expected
    baseline = _literature(name)
    assert config_to_dict(config)["train"] == config_to_dict(baseline)["train"]
    assert config_to_dict(config)["model"] == config_to_dict(baseline)["model"]


def test_loss_override_with_its_own_hyper_parameter() -> None:
    config = _literature("cub_googlenet_64.yaml", ["loss.name=triplet", "loss.margin=0.1"])
    assert config.loss.name == "triplet" and config.loss.params["margin"] == 0.1
    config = _literature("sop_resnet50_512.yaml", ["loss.name=proxyanchor", "loss.alpha=16"])
    assert config.loss.params["alpha"] == 16.0


@pytest.mark.parametrize("name", sorted(LITERATURE))
def test_literature_config_comments_show_how_to_run_it(name: str) -> None:
    text = (CONFIGS / name).read_text(encoding="utf-8")
    assert f"mbdl train configs/{name} data.root=" in text
    assert f"mbdl train configs/{name} data.root=" in text.split("loss.name=triplet")[0]
    assert f"mbdl compare configs/{name} --losses {COMPARE_LOSSES} --seeds 3" in text
    # the paper's comparison: MDL and the losses of its era, each one a registered loss (a loss
    # added later does not change the literature protocol)
    assert "mdl" in COMPARE_LOSSES.split(",") and set(COMPARE_LOSSES.split(",")) <= set(LOSS_NAMES)
    assert "Follows:" in text and "Differs:" in text


def test_literature_doc_covers_every_literature_config() -> None:
    text = LITERATURE_DOC.read_text(encoding="utf-8")
    for name in LITERATURE:
        assert f"configs/{name}" in text, name
    assert f"--losses {COMPARE_LOSSES} --seeds 3" in text
    assert "reconstructed from the abstract" in text
