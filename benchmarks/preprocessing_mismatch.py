"""The preprocessing mismatch made visible: test MAP@R of pretrained networks (no training: their
pooled features, L2-normalised) with the statistics their weights expect against forced
ImageNet statistics, on a config's data (e.g. the icons data set).

Rows:

- ``mobilenet_v2`` (torchvision's ImageNet weights, a local file): its own statistics are
  ImageNet's, so forcing ImageNet's changes nothing (the control row).
- ``timm/mobilenetv2_100`` with weights that expect mean = std = 0.5 (as CLIP-, ViT- and
  Inception-style weights do). No such timm weights are reachable offline, so they are built
  locally: torchvision's MobileNetV2 ImageNet weights, mapped onto timm's ``mobilenetv2_100``
  (same layers in the same order; the outputs are checked equal), with the change of input
  statistics folded into the first convolution and its BatchNorm (exact except at the zero
  padded border), saved in timm's hub layout with ``pretrained_cfg`` mean = std = 0.5. Fed
  ImageNet-normalised images, this network sees inputs about 2.2x too large and shifted.

    python benchmarks/preprocessing_mismatch.py configs/icons_mobilenet_v2.yaml \
        data.root=~/.cache/mbdl/icons --weights /path/mobilenet_v2-b0353104.pth \
        --out benchmarks/results/preprocessing_mismatch.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbdl.config import load_config
from mbdl.evaluate import embed_dataset, evaluate
from mbdl.fileio import atomic_write_text
from mbdl.inference import load_data
from mbdl.model.preprocessing import IMAGENET_MEAN, IMAGENET_STD, config_statistics
from mbdl.models import build_backbone

HALF = (0.5, 0.5, 0.5)


class PooledFeatures(nn.Module):
    """``images -> normalize(backbone(images))``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.backbone(images), dim=1)


def half_statistics_timm_weights(torchvision_file: str, directory: Path) -> float:
    """Write timm ``mobilenetv2_100`` weights expecting mean = std = 0.5 into ``directory``
    (timm's hub layout); returns max |timm - torchvision| of the mapped logits (before folding)."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    source = torch.load(torchvision_file, map_location="cpu", weights_only=True)
    target = timm.create_model("mobilenetv2_100", num_classes=1000)
    keys = list(target.state_dict())
    values = list(source.values())
    if len(keys) != len(values):
        raise SystemExit("torchvision and timm MobileNetV2 state dicts differ in length")
    mapped = dict(zip(keys, values, strict=True))
    target.load_state_dict(mapped)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(source)
    with torch.no_grad():
        probe = torch.randn(2, 3, 96, 96)
        diff = float((target.eval()(probe) - reference.eval()(probe)).abs().max())
    # x_imagenet = a * x_half + b with x_half = (x - 0.5) / 0.5
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    a, b = 0.5 / std, (0.5 - mean) / std
    weight = mapped["conv_stem.weight"]
    shift = (weight * b.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))  # conv of the constant b
    mapped["conv_stem.weight"] = weight * a.view(1, 3, 1, 1)
    mapped["bn1.running_mean"] = mapped["bn1.running_mean"] - shift
    directory.mkdir(parents=True, exist_ok=True)
    kept = {k: v.contiguous() for k, v in mapped.items() if not k.startswith("classifier.")}
    save_file(kept, directory / "model.safetensors")
    config = {
        "architecture": "mobilenetv2_100",
        "num_classes": 0,
        "pretrained_cfg": {
            "mean": list(HALF),
            "std": list(HALF),
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "input_size": [3, 224, 224],
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return diff


def zero_shot(config_file: str, overrides: list[str]) -> dict[str, Any]:
    """Test metrics of the pretrained network ``overrides`` name, no training."""
    config = load_config(config_file, overrides)
    splits = load_data(config)
    backbone, _ = build_backbone(
        config.model.backbone, pretrained=config.model.pretrained, in_channels=splits.channels
    )
    model = PooledFeatures(backbone).eval()
    start = time.perf_counter()
    embeddings, labels = embed_dataset(model, splits.test, batch_size=128, device="cpu")
    metrics = evaluate(embeddings, labels, ks=[1], metrics=["recall@1", "map@r"])
    statistics = config_statistics(config)
    return {
        "mean": list(statistics.mean),
        "std": list(statistics.std),
        "statistics_from": statistics.origin,
        "test_images": len(splits.test),
        "map@r": float(metrics["map@r"]),
        "recall@1": float(metrics["recall@1"]),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config file (its data section is used)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=PATH")
    parser.add_argument("--weights", required=True, help="torchvision MobileNetV2 ImageNet file")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    forced = [f"data.mean={list(IMAGENET_MEAN)}", f"data.std={list(IMAGENET_STD)}"]
    rows: dict[str, Any] = {}
    mobilenet = [*args.overrides, "model.backbone=mobilenet_v2", f"model.pretrained={args.weights}"]
    rows["mobilenet_v2, own statistics (ImageNet)"] = zero_shot(args.config, mobilenet)
    rows["mobilenet_v2, forced ImageNet statistics"] = zero_shot(args.config, [*mobilenet, *forced])
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mobilenetv2_100-half"
        mapped_diff = half_statistics_timm_weights(args.weights, weights)
        timm_model = [
            *args.overrides,
            "model.backbone=timm/mobilenetv2_100",
            f"model.pretrained={weights}",
        ]
        rows["timm mobilenetv2_100 (expects 0.5/0.5), own statistics"] = zero_shot(
            args.config, timm_model
        )
        rows["timm mobilenetv2_100 (expects 0.5/0.5), forced ImageNet statistics"] = zero_shot(
            args.config, [*timm_model, *forced]
        )
    for name, row in rows.items():
        print(f"{name:70s} MAP@R {row['map@r']:.4f}  R@1 {row['recall@1']:.4f}", file=sys.stderr)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "torch_threads": 2,
        "timm_mapping_max_abs_logit_diff": mapped_diff,
        "note": "zero-shot (no training); the 0.5/0.5 timm weights are built locally from "
        "torchvision's MobileNetV2 ImageNet weights (no such weights reachable offline)",
        "rows": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
