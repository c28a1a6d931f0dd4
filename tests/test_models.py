"""Backbones and the embedding model: normalised embeddings of the asked size, pretrained
weights from a local file, a clear error for hub weights without a network, frozen BatchNorm."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from mbdl.models import BACKBONES, EmbeddingModel, PretrainedWeightsError, build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("backbone", BACKBONES.builtin_names())
def test_every_backbone_gives_normalised_embeddings(backbone):
    model = build_model(backbone, 24, in_channels=3, head_bn=backbone == "resnet18")
    assert isinstance(model, EmbeddingModel)
    assert model.embedding_dim == 24 and model.in_channels == 3
    model.eval()
    with torch.no_grad():
        embeddings = model(torch.randn(2, 3, 64, 64))
    assert embeddings.shape == (2, 24)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
    head_params = {id(p) for p in model.head.parameters()}
    backbone_params = {id(p) for p in model.backbone.parameters()}
    assert head_params and backbone_params and not head_params & backbone_params
    assert head_params | backbone_params == {id(p) for p in model.parameters()}


def test_smallcnn_grey_32_training_step_and_unnormalised_option():
    model = build_model("smallcnn", 64, in_channels=1, head_bn=True)
    images = torch.randn(8, 1, 32, 32)
    embeddings = model(images)
    assert embeddings.shape == (8, 64)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(8))
    embeddings.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    raw = build_model("smallcnn", 16, in_channels=3, normalize=False).eval()
    with torch.no_grad():
        assert not torch.allclose(raw(torch.randn(4, 3, 32, 32)).norm(dim=1), torch.ones(4))


def test_grey_input_for_a_torchvision_backbone():
    model = build_model("mobilenet_v2", 8, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 8)


def test_local_weights_file_is_loaded(tmp_path):
    reference = torchvision.models.resnet18(weights=None, num_classes=10)  # classifier differs
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 16, pretrained=str(path))
    for name, tensor in model.backbone.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=0, atol=0)
    # grey input: the first convolution is the sum of the RGB filters
    grey = build_model("resnet18", 16, pretrained=path, in_channels=1)
    torch.testing.assert_close(
        grey.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True)
    )
    # wrapped and DataParallel-prefixed state dicts are accepted
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    wrapped = build_model("resnet18", 16, pretrained=path)
    torch.testing.assert_close(wrapped.backbone.conv1.weight, reference.conv1.weight)


def test_local_weights_for_googlenet_ignore_aux_classifiers(tmp_path):
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "googlenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("googlenet", 8, pretrained=path).eval()
    torch.testing.assert_close(model.backbone.conv1.conv.weight, reference.conv1.conv.weight)
    assert model.backbone.transform_input is True


def test_bad_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="file not found"):
        build_model("resnet18", 8, pretrained=str(tmp_path / "nope.pth"))
    mobilenet = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet.pth"
    torch.save(mobilenet.state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"do not fit resnet18: .*missing keys"):
        build_model("resnet18", 8, pretrained=path)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(PretrainedWeightsError, match="cannot load pretrained weights"):
        build_model("resnet18", 8, pretrained=tmp_path / "junk.pth")


def test_hub_weights_without_network_fail_with_one_clear_line(monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError) as error:
        build_model("resnet18", 8, pretrained="IMAGENET1K_V1")
    message = str(error.value)
    assert "\n" not in message
    assert "IMAGENET1K_V1" in message and "local path" in message and "name resolution" in message
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    with pytest.raises(PretrainedWeightsError, match="IMAGENET1K_V1"):
        build_model("efficientnet_b0", 8, pretrained="DEFAULT")
    assert calls[-1] == torchvision.models.EfficientNet_B0_Weights.DEFAULT.url


def test_hub_weights_are_loaded_when_available(monkeypatch):
    reference = torchvision.models.mobilenet_v2(weights=None)
    monkeypatch.setattr(
        torch.hub, "load_state_dict_from_url", lambda url, **kw: reference.state_dict()
    )
    model = build_model("mobilenet_v2", 8, pretrained="MobileNet_V2_Weights.IMAGENET1K_V2")
    torch.testing.assert_close(
        model.backbone.features[0][0].weight, reference.features[0][0].weight
    )


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vgg11'"):
        build_model("vgg11", 8)
    with pytest.raises(ValueError, match="unknown pretrained weights 'IMAGENET9K'"):
        build_model("resnet18", 8, pretrained="IMAGENET9K")
    with pytest.raises(ValueError, match="smallcnn has no torchvision weights"):
        build_model("smallcnn", 8, pretrained="DEFAULT")
    with pytest.raises(ValueError, match="embedding_dim"):
        build_model("smallcnn", 1)


def test_freeze_bn_keeps_running_stats_and_affine_fixed():
    model = build_model("smallcnn", 16, in_channels=1, freeze_bn=True, head_bn=True)
    model.train()
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and all(not m.training for m in batchnorms)
    assert all(not p.requires_grad for m in batchnorms for p in m.parameters())
    assert model.head[1].training  # the head's BatchNorm still trains
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(torch.randn(8, 1, 32, 32) * 3 + 1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model.backbone.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    # without freeze_bn the same steps move the statistics
    free = build_model("smallcnn", 16, in_channels=1)
    free.train()
    start = free.backbone.features[1].running_mean.clone()
    free(torch.randn(8, 1, 32, 32) * 3 + 1)
    assert not torch.allclose(free.backbone.features[1].running_mean, start)
