"""Cross-batch memory in the trainer: the memory is used, saved with last.pt, restored exactly on
resume, and refused (config error) for a proxy loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mbdl.config import ConfigError, load_config
from mbdl.train import train
from mbdl.train import trainer as trainer_module
from mbdl.train.checkpoint import load_checkpoint

# 40 glyph classes (17 training classes); 2 epochs of 3 batches of 8 x 4 images; a memory of 48
# (1.5 batches: it wraps during the run) used from the 2nd step on.
SMALL = [
    "data.max_classes=40",
    "model.embedding_dim=16",
    "train.epochs=2",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=3",
    "train.warmup_epochs=0.5",
    "train.checkpoint_every_steps=2",
    "train.xbm_size=48",
    "train.xbm_warmup_steps=1",
    "train.progress=false",
    "train.device=cpu",
    "eval.ks=[1, 2]",
    "eval.report=false",
]


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("glyph-cache"))


def config(out: Path, cache: str, *extra: str) -> Any:
    return load_config(None, [*SMALL, f"data.root={cache}", f"out={out}", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, glyph_cache: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "xbm"
    return out, train(config(out, glyph_cache))


def test_checkpoint_holds_the_memory(reference: tuple[Path, dict]) -> None:
    out, _ = reference
    state = load_checkpoint(out / "checkpoints" / "last.pt")["xbm_state"]
    assert int(state["steps"]) == 6 and int(state["filled"]) == 48
    assert int(state["position"]) == (6 * 32) % 48
    assert state["memory"].shape == (48, 16)
    norms = state["memory"].norm(dim=1)  # entries are L2-normalised embeddings
    assert torch.allclose(norms, torch.ones(48), atol=1e-5)


def test_memory_changes_the_training(
    reference: tuple[Path, dict], tmp_path: Path, glyph_cache: str
) -> None:
    out, _ = reference
    plain = tmp_path / "plain"
    train(
        config(plain, glyph_cache, "train.xbm_size=0", "train.epochs=1", "train.warmup_epochs=0.5")
    )
    with_memory = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    without = json.loads((plain / "log.jsonl").read_text().splitlines()[0])
    # the first step is the same (warm-up); steps 2 and 3 see the memory
    assert with_memory["train_loss"] != without["train_loss"]
    assert "xbm_state" not in load_checkpoint(plain / "checkpoints" / "last.pt")


def test_resume_restores_the_memory_exactly(
    reference: tuple[Path, dict], tmp_path: Path, glyph_cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, metrics = reference
    run = tmp_path / "interrupted"
    original = trainer_module.Trainer._train_step

    def interrupt_at_step_5(self: Any, images: torch.Tensor, labels: torch.Tensor) -> float:
        if self.progress.global_step == 4:
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config(run, glyph_cache))
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", original)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["xbm_state"]
    assert int(saved["steps"]) == 4 and int(saved["filled"]) == 48

    assert train(config(run, glyph_cache, "resume=true")) == metrics
    expected = load_checkpoint(out / "checkpoints" / "last.pt")
    got = load_checkpoint(run / "checkpoints" / "last.pt")
    for part in ("model_state", "xbm_state"):
        for key, value in expected[part].items():
            assert torch.equal(value, got[part][key]), (part, key)


def test_proxy_loss_with_memory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"train\.xbm_size=48 needs a loss that takes a reference"
    ):
        load_config(None, ["loss.name=proxyanchor", "train.xbm_size=48"])
    with pytest.raises(ConfigError, match=r"train\.xbm_size must be >= 0"):
        load_config(None, ["train.xbm_size=-1"])
    assert load_config(None, ["loss.name=proxyanchor"]).train.xbm_size == 0
