"""data.num_workers=auto (mbdl.data.workers) and its config key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbdl.config import ConfigError, load_config
from mbdl.data import workers as workers_module
from mbdl.data.batched import batched_training_data
from mbdl.data.cache import DecodedEvaluationSplit
from mbdl.data.splits import ArrayImageDataset
from mbdl.data.transforms import build_transforms
from mbdl.data.workers import loader_workers


def glyphs(transform_train: bool) -> ArrayImageDataset:
    images = np.zeros((8, 16, 16), dtype=np.uint8)
    return ArrayImageDataset(
        images, np.arange(8) % 2, ["a", "b"], None, build_transforms(transform_train, 16, 1)
    )


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 2), (2, 1), (16, 8), (64, 64)])
def test_auto_is_sized_to_the_machine_and_the_data_path(
    monkeypatch: pytest.MonkeyPatch, cpus: int, threads: int
) -> None:
    monkeypatch.setattr(workers_module, "cpu_count", lambda: cpus)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    batches = batched_training_data(glyphs(True))
    assert batches is not None
    # a batch worker only on a CPU the training step's threads leave free
    assert loader_workers("auto", batches, training=True) == (1 if cpus > threads else 0)
    per_image = glyphs(True)  # e.g. a custom transform: PIL per image
    assert loader_workers("auto", per_image, training=True) == min(cpus - 1, 8)
    assert loader_workers("auto", glyphs(False), training=False) == 0  # evaluation from memory
    decoded = DecodedEvaluationSplit.__new__(DecodedEvaluationSplit)
    assert loader_workers("auto", decoded, training=False) == 0
    assert loader_workers("auto", object(), training=False) == min(cpus - 1, 8)  # files
    assert loader_workers(3, batches, training=True) == 3  # a number is kept


def test_config_key_takes_auto_or_a_count() -> None:
    assert load_config(None, []).data.num_workers == "auto"
    assert load_config(None, ["data.num_workers=2"]).data.num_workers == 2
    with pytest.raises(ConfigError, match=r"data\.num_workers"):
        load_config(None, ["data.num_workers=many"])
    with pytest.raises(ConfigError, match=r"data\.num_workers"):
        load_config(None, ["data.num_workers=-1"])


@pytest.mark.parametrize("cpus", [1, 2, 16])
def test_auto_with_a_gpu_overlaps_loading_and_says_why(
    monkeypatch: pytest.MonkeyPatch, cpus: int
) -> None:
    from mbdl.data.workers import MAX_GPU_WORKERS, loader_workers_reason

    monkeypatch.setattr(workers_module, "cpu_count", lambda: cpus)
    monkeypatch.setattr(torch, "get_num_threads", lambda: cpus)
    batches = batched_training_data(glyphs(True))
    count, why = loader_workers_reason("auto", batches, training=True, gpu=True)
    assert count == min(2, cpus - 1) and "GPU" in why
    count, why = loader_workers_reason("auto", glyphs(True), training=True, gpu=True)
    assert count == min(cpus - 1, MAX_GPU_WORKERS) and "one by one" in why
    assert loader_workers_reason(5, batches, training=True, gpu=True) == (5, "data.num_workers")
