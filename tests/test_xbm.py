"""Cross-batch memory equals the loss on the batch against the concatenated reference set."""

from __future__ import annotations

import pytest
import torch

from mbdl.losses import build_loss
from mbdl.losses.xbm import CrossBatchMemory


@pytest.mark.parametrize("name", ["mdl", "contrastive", "triplet", "multisimilarity"])
def test_xbm_equals_loss_on_concatenated_reference(name: str) -> None:
    torch.manual_seed(0)
    loss = build_loss(name)
    xbm = CrossBatchMemory(build_loss(name), memory_size=20, embedding_dim=8, warmup_steps=1)
    batches = [
        (torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(4)
    ]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step, (emb, labels) in enumerate(batches):
        emb = emb.clone().requires_grad_(True)
        got = xbm(emb, labels)
        if step == 0:  # warm-up: the plain batch loss
            expected = loss(emb, labels)
        else:
            memory = torch.cat([e for e, _ in seen])[-20:]
            memory_labels = torch.cat([lab for _, lab in seen])[-20:]
            ref = torch.cat([emb, memory.to(emb.dtype)])
            ref_labels = torch.cat([labels, memory_labels])
            expected = loss(emb, labels, ref, ref_labels, anchor_offset=0)
        assert torch.allclose(got, expected, atol=1e-6), (name, step)
        (grad,) = torch.autograd.grad(got, emb)
        (expected_grad,) = torch.autograd.grad(expected, emb)
        assert torch.allclose(grad, expected_grad, atol=1e-6), (name, step)
        seen.append((emb.detach(), labels))
    assert int(xbm.filled) == 20 and int(xbm.steps) == 4


def test_memory_wraps_and_survives_state_dict() -> None:
    xbm = CrossBatchMemory(build_loss("mdl"), memory_size=5, embedding_dim=3)
    for value in range(3):
        xbm.enqueue(torch.full((2, 3), float(value)), torch.full((2,), value))
    memory, memory_labels = xbm.reference_set()
    assert sorted(memory_labels.tolist()) == [0, 1, 1, 2, 2]  # the oldest entry was overwritten
    restored = CrossBatchMemory(build_loss("mdl"), memory_size=5, embedding_dim=3)
    restored.load_state_dict(xbm.state_dict())
    assert torch.equal(restored.reference_set()[0], memory)


def test_eval_mode_neither_uses_nor_fills_memory() -> None:
    xbm = CrossBatchMemory(build_loss("mdl"), memory_size=5, embedding_dim=3).eval()
    xbm(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    assert int(xbm.filled) == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="memory_size"):
        CrossBatchMemory(build_loss("mdl"), memory_size=0, embedding_dim=3)
    with pytest.raises(ValueError, match="warmup_steps"):
        CrossBatchMemory(build_loss("mdl"), memory_size=4, embedding_dim=3, warmup_steps=-1)
