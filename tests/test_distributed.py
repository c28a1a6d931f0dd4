"""GatheredLoss under 2 gloo processes equals one process on the concatenated batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mbdl.distributed import GatheredLoss, distributed_info, gather_with_grad
from mbdl.losses import build_loss

LOSS_PARAMS = {
    "mdl": {"margin": 0.2},
    "contrastive": {},
    "triplet": {"mining": "all"},
    "multisimilarity": {},
}
BATCH_PER_RANK = 12
DIM_IN, DIM_OUT = 6, 4


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2 * BATCH_PER_RANK, DIM_IN, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (2 * BATCH_PER_RANK,), generator=generator)
    torch.manual_seed(seed)
    model = nn.Linear(DIM_IN, DIM_OUT).double()
    return inputs, labels, model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(rank: int, init_method: str, out_dir: str, names: list[str], sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        inputs, labels, model = _data()
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        results = {}
        for name in names:
            model.zero_grad()
            loss = GatheredLoss(build_loss(name, **LOSS_PARAMS[name]))(
                model(inputs[local]), labels[local]
            )
            loss.backward()
            for parameter in model.parameters():  # what DistributedDataParallel does: average
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()
            results[name] = {
                "loss": loss.item(),
                "grads": [p.grad.flatten().tolist() for p in model.parameters()],
            }
        results["info"] = distributed_info().__dict__
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # no rank tears gloo down while the other still communicates
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sizes", [[BATCH_PER_RANK, BATCH_PER_RANK], [BATCH_PER_RANK + 3, BATCH_PER_RANK - 3]]
)
def test_two_ranks_equal_one_process_on_concatenated_batch(
    tmp_path: Path, sizes: list[int]
) -> None:
    names = list(LOSS_PARAMS)
    mp.start_processes(
        _worker,
        args=(f"tcp://127.0.0.1:{free_port()}", str(tmp_path), names, sizes),
        nprocs=2,
        start_method="spawn",
    )
    inputs, labels, model = _data()
    for name in names:
        model.zero_grad()
        loss = build_loss(name, **LOSS_PARAMS[name])(model(inputs), labels)
        loss.backward()
        expected = [p.grad.flatten().tolist() for p in model.parameters()]
        assert loss.item() > 0, name
        for rank in range(2):
            got = json.loads((tmp_path / f"rank{rank}.json").read_text())
            assert got["info"]["world_size"] == 2
            assert got[name]["loss"] == pytest.approx(loss.item(), abs=1e-6), name
            for g, e in zip(got[name]["grads"], expected, strict=True):
                assert torch.allclose(torch.tensor(g), torch.tensor(e), atol=1e-6), name


def test_single_process_is_a_no_op() -> None:
    embeddings, labels = torch.randn(5, 3), torch.arange(5)
    all_emb, all_labels = gather_with_grad(embeddings, labels)
    assert all_emb is embeddings and all_labels is labels
    assert distributed_info().world_size == int(os.environ.get("WORLD_SIZE", 1))
