"""pytorch-metric-learning losses inside mbdl: ``loss.name=pml:<LossClass>`` (and
``loss.miner=pml:<MinerClass>``), validated like a built-in, trained, evaluated, with cross-batch
memory's self pairs removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbdl.cli import main
from mbdl.config import ConfigError, load_config
from mbdl.losses import build_loss, loss_class

losses = pytest.importorskip("pytorch_metric_learning.losses")

SMALL = [
    "data.max_classes=24",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.batch_classes=4",
    "train.batch_per_class=2",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
    "train.num_threads=1",
    "train.progress=false",
    "eval.ks=[1]",
    "eval.report=false",
]


@pytest.mark.parametrize(
    "loss",
    [
        ["loss.name=pml:ContrastiveLoss", "loss.pos_margin=0.1", "loss.neg_margin=0.9"],
        ["loss.name=pml:MultiSimilarityLoss", "loss.miner=pml:MultiSimilarityMiner"],
        ["loss.name=pml:ArcFaceLoss", "loss.margin=20.0", "loss.scale=32"],
    ],
)
def test_three_pml_losses_train_and_evaluate(loss: list[str], tmp_path: Path) -> None:
    from mbdl.train.trainer import Trainer

    config = load_config(None, [*SMALL, *loss, f"out={tmp_path / 'run'}"])
    trainer = Trainer(config)
    try:
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.fit()
        after = list(trainer.model.parameters())
        classes = len(set(trainer.splits.train.labels.tolist()))
    finally:
        trainer.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    if "ArcFace" in loss[0]:  # the class weights are trained and saved with the loss
        state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
        assert state["loss_state"]["loss.W"].shape == (8, classes)


def test_pml_keyword_arguments_are_validated_like_a_builtin() -> None:
    with pytest.raises(ConfigError, match=r"unknown key loss\.margin.*loss\.pos_margin"):
        load_config(None, ["loss.name=pml:ContrastiveLoss", "loss.margin=1"])
    with pytest.raises(ConfigError, match=r"loss\.alpha must be a float"):
        load_config(None, ["loss.name=pml:MultiSimilarityLoss", "loss.alpha=many"])
    config = load_config(None, ["loss.name=pml:ContrastiveLoss", "loss.pos_margin=0.25"])
    # PML's integer default neg_margin=1 is a float hyper-parameter
    assert config.loss.params == {"pos_margin": 0.25, "neg_margin": 1.0, "miner": None}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("pml:CrossBatchMemory", "is not a pytorch-metric-learning loss"),
        ("pml:MultiSimilarityMiner", "is not a class of pytorch_metric_learning.losses"),
        ("pml:NoSuchLoss", "is not a class of pytorch_metric_learning.losses"),
    ],
)
def test_a_pml_class_that_is_not_a_loss_is_one_line(
    value: str, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["train", f"loss.name={value}", f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match=r"not a class of pytorch_metric_learning\.miners"):
        load_config(None, ["loss.name=pml:ContrastiveLoss", "loss.miner=pml:ContrastiveLoss"])


def test_reference_set_with_its_own_copy_equals_the_batch_alone() -> None:
    """``anchor_offset``: the self pairs of a reference set that holds the batch are removed, so
    the loss equals PML's loss of the batch by itself."""
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    labels = torch.arange(6).repeat_interleave(2)
    others = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    for name in ("pml:ContrastiveLoss", "pml:MultiSimilarityLoss"):
        loss = build_loss(name)
        alone = loss(embeddings, labels)
        expected = loss_class(name).pml_class()(embeddings, labels)
        torch.testing.assert_close(alone, expected)
        ref = torch.cat([others, embeddings])
        ref_labels = torch.cat([torch.full((5,), 99), labels])
        with_ref = loss(embeddings, labels, ref, ref_labels, anchor_offset=5)
        assert torch.isfinite(with_ref)
        copy, copy_labels = embeddings.clone(), labels.clone()  # PML spots only the same object
        torch.testing.assert_close(
            loss(embeddings, labels, copy, copy_labels, anchor_offset=0), alone
        )
    # the self pairs would count (a positive at similarity 1) without the offset
    multi = build_loss("pml:MultiSimilarityLoss")
    copy, copy_labels = embeddings.clone(), labels.clone()
    assert not torch.allclose(
        multi(embeddings, labels, copy, copy_labels), multi(embeddings, labels)
    )
    arcface = build_loss("pml:ArcFaceLoss", num_classes=6, embedding_dim=8)
    with pytest.raises(ValueError, match=r"takes no reference set"):
        arcface(embeddings, labels, embeddings, labels)
    with pytest.raises(ConfigError, match=r"train\.xbm_size"):
        load_config(None, ["loss.name=pml:ArcFaceLoss", "train.xbm_size=64"])


def test_pml_runs_with_cross_batch_memory_and_load_without_trusting_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MBDL_TRUST_PLUGINS", raising=False)
    out = tmp_path / "run"
    args = [*SMALL, "loss.name=pml:ContrastiveLoss", "train.xbm_size=32", f"out={out}"]
    assert main(["train", *args]) == 0
    from mbdl.export import load_embedder

    model, _ = load_embedder(out)  # pml: names a library class, not code to import
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 8)
