"""The reference row every deep-metric-learning table starts from: the pretrained network with no
training at all. Its pooled backbone features, L2-normalised, are evaluated on the validation and
test classes of a config's data (same splits, image size and evaluation transform as training).

    python benchmarks/zero_shot.py configs/icons_mobilenet_v2.yaml data.root=... \
        model.pretrained=/path/mobilenet_v2-b0353104.pth --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbdl.config import load_config
from mbdl.evaluate import embed_dataset, evaluate
from mbdl.fileio import atomic_write_text
from mbdl.inference import load_data
from mbdl.models import build_backbone
from mbdl.train.preflight import describe_data


class PooledFeatures(nn.Module):
    """``images -> normalize(backbone(images))``: the backbone's pooled features, unit length."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.backbone(images), dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config file (its data and model sections are used)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=PATH")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if config.model.pretrained is None:
        parser.error("model.pretrained is null: there is no pretrained network to evaluate")
    if config.train.num_threads is not None:
        torch.set_num_threads(config.train.num_threads)
    splits = load_data(config)
    print(describe_data(splits), file=sys.stderr)
    backbone, feature_dim = build_backbone(
        config.model.backbone, pretrained=config.model.pretrained, in_channels=splits.channels
    )
    model = PooledFeatures(backbone).eval()
    result: dict[str, object] = {
        "backbone": config.model.backbone,
        "pretrained": Path(str(config.model.pretrained)).name,
        "feature_dim": feature_dim,
        "image_size": splits.image_size,
    }
    for name in ("val", "test"):
        start = time.perf_counter()
        embeddings, labels = embed_dataset(model, getattr(splits, name), batch_size=128)
        metrics = evaluate(
            embeddings,
            labels,
            ks=tuple(config.eval.ks),
            distance=config.eval.distance,
            seed=config.seed,
        )
        result["validation" if name == "val" else "test"] = metrics
        result[f"{name}_seconds"] = time.perf_counter() - start
        print(
            f"{name}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
            file=sys.stderr,
        )
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
