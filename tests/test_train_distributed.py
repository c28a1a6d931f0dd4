"""``torchrun --nproc_per_node 2 -m mbdl train`` with gloo on CPU: one writer (rank 0), an
interrupted run resumed under torchrun, ranks kept identical (model and loss parameters: checked
inside the interrupted run, where the check also has to flag a tensor that differs on purpose),
and per-rank augmentation seeds.

The end-to-end test is marked slow: by default it runs an interrupted 2-process run and its
resumption; with ``MBDL_SLOW=1`` it also runs the same training uninterrupted and checks that the
resumed run ends with identical weights and metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mbdl.config import ConfigError, load_config
from mbdl.data import ClassBalancedBatchSampler
from mbdl.distributed import average_gradients, replicas_differ
from mbdl.train import train
from mbdl.train.checkpoint import load_checkpoint
from mbdl.train.seeding import SeededBatches

FULL = os.environ.get("MBDL_SLOW", "") not in ("", "0")

# 30 glyph classes; 2 epochs of 2 steps per rank (8 classes x 4 images per rank and step);
# margin loss: its learnable beta is a loss parameter that DDP does not see, and it samples
# negatives at random; a cross-batch memory of 96 (1.5 global batches) used from step 2.
SMALL = [
    "data.max_classes=30",
    "model.embedding_dim=16",
    "loss.name=margin",
    "train.epochs=2",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=2",
    "train.warmup_epochs=0.5",
    "train.checkpoint_every_steps=1",
    "train.xbm_size=96",
    "train.xbm_warmup_steps=1",
    "train.device=cpu",
    "train.num_threads=1",
    "train.progress=false",
    "eval.ks=[1, 2]",
    "eval.report=false",
]

INTERRUPTING = """
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mbdl.distributed import average_gradients, replicas_differ
from mbdl.train import trainer

original = trainer.Trainer._train_step


def interrupt(self, images, labels):
    if self.progress.global_step == 3:  # the 4th step: epoch 2, after its mid-epoch checkpoint
        rank = dist.get_rank()
        tensors = dict(self.model.named_parameters(prefix="model"))
        tensors.update(self.loss.named_parameters(prefix="loss"))
        tensors["rank"] = torch.tensor([float(rank)])  # differs on purpose
        # the loss of step 3 (after rank 0 alone validated): the same on every rank, also for
        # margin's randomly sampled negatives
        tensors["loss"] = torch.tensor([self.progress.epoch_loss_sum])
        tensors["memory"] = self.memory.memory  # the gathered embeddings of every rank
        probe = torch.nn.Parameter(torch.zeros(2))
        probe.grad = torch.full((2,), float(rank + 1))
        average_gradients([probe])
        found = {"differ": replicas_differ(tensors), "grad": probe.grad.tolist()}
        Path(sys.argv[1]).joinpath(f"rank{rank}.json").write_text(json.dumps(found))
        raise KeyboardInterrupt
    return original(self, images, labels)


trainer.Trainer._train_step = interrupt
from mbdl.cli import main

sys.exit(main(sys.argv[2:]))
"""


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def train_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", *SMALL, f"data.root={cache}", f"out={out}", *extra]


def log_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_training_interrupted_and_resumed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = tmp_path / "interrupting.py"
    script.write_text(INTERRUPTING)
    run = tmp_path / "interrupted"
    stopped = torchrun(str(script), str(tmp_path), *train_args(run, cache))
    assert stopped.returncode != 0  # both ranks stop with KeyboardInterrupt (exit 130)
    for rank in range(2):  # after 3 steps the ranks' model and loss parameters are identical
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["differ"] == ["rank"]
        assert found["grad"] == [1.5, 1.5]  # loss-parameter gradients: the mean over ranks
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["world_size"] == 2
    assert last["progress"]["global_step"] == 3
    assert last["progress"]["epoch"] == 1 and last["progress"]["step_in_epoch"] == 1
    memory = last["xbm_state"]  # 3 steps of 2 x 32 gathered embeddings in a ring of 96
    assert int(memory["steps"]) == 3 and int(memory["filled"]) == 96
    assert int(memory["position"]) == (3 * 64) % 96
    assert not (run / "metrics.json").exists()
    assert stopped.stderr.count("mbdl: interrupted") == 1  # rank 0 alone reports

    resumed = torchrun("-m", "mbdl", *train_args(run, cache, "resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("test:") == 1  # only rank 0 prints the results
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"validation", "test", "verification", "meta"}
    assert "map@r" in metrics["test"]
    records = log_records(run)
    assert [r["epoch"] for r in records] == [1, 2]  # one writer: no duplicated records
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["world_size"] == 2 and r["images_per_s"] > 0 for r in records)
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["progress"]["global_step"] == 4
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "log.jsonl",
        "metrics.json",
    ]
    # one process cannot continue a run written by two (the schedule and batches would change)
    with pytest.raises(ConfigError, match="written by 2 process"):
        train(load_config(None, [*SMALL, f"data.root={cache}", f"out={run}", "resume=true"]))
    if not FULL:
        return
    reference = tmp_path / "uninterrupted"
    complete = torchrun("-m", "mbdl", *train_args(reference, cache))
    assert complete.returncode == 0, complete.stderr[-3000:]
    assert json.loads((reference / "metrics.json").read_text()) == metrics
    expected = load_checkpoint(reference / "checkpoints" / "last.pt")
    for part in ("model_state", "loss_state", "xbm_state"):
        for key, value in expected[part].items():
            assert torch.equal(value, final[part][key]), (part, key)
    assert [(r["train_loss"], r["validation"]) for r in log_records(reference)] == [
        (r["train_loss"], r["validation"]) for r in records
    ]


def test_single_process_helpers_are_no_ops() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    average_gradients([param])
    assert param.grad.tolist() == [1.0, 1.0]
    assert replicas_differ({"x": torch.ones(2)}) == []


def _seeds(sampler: ClassBalancedBatchSampler) -> list[list[int]]:
    return [[seed for _, seed in batch] for batch in SeededBatches(sampler, seed=7)]


def test_augmentation_seeds_follow_the_global_batch_number() -> None:
    labels = np.repeat(np.arange(12), 8)
    single = ClassBalancedBatchSampler(labels, 4, 2, seed=1)
    ranks = [
        ClassBalancedBatchSampler(labels, 4, 2, seed=1, num_replicas=2, rank=r) for r in (0, 1)
    ]
    for sampler in (single, *ranks):
        sampler.set_epoch(3)
    one = _seeds(single)
    # one process keeps the seeds of (seed, epoch, batch number): unchanged by distribution support
    first = np.random.SeedSequence([7, 3, 0]).generate_state(len(one[0]), dtype=np.uint64)
    assert one[0] == [int(s) & (2**63 - 1) for s in first]
    by_rank = [_seeds(r) for r in ranks]
    assert by_rank[0][0] != by_rank[1][0]  # ranks augment differently
    assert by_rank[0] == one[0 : 2 * len(by_rank[0]) : 2]  # rank r has global batches r, r + 2, ...
    assert by_rank[1] == one[1 : 2 * len(by_rank[1]) : 2]
    ranks[1].set_epoch(3, start_batch=1)  # a resumed rank keeps its seeds
    assert _seeds(ranks[1]) == by_rank[1][1:]


@pytest.mark.slow
def test_torchrun_with_accumulation_and_weight_average(tmp_path: Path) -> None:
    """Two processes, 2 micro-batches per step (the first without gradient synchronisation) and
    the weight average on rank 0: the ranks stay identical (checked after every epoch) and the
    run completes with the average in last.pt."""
    run = tmp_path / "run"
    extra = ("train.accumulate=2", "train.ema=0.9", "train.max_steps_per_epoch=1")
    done = torchrun("-m", "mbdl", *train_args(run, tmp_path / "cache", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in log_records(run)] == [1, 2]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and int(last["xbm_state"]["steps"]) == 4  # 2 x 2 micro-batches
    assert last["callbacks"]["ExponentialMovingAverage"]["updates"] == 2
