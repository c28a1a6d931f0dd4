"""SupConLoss (Khosla et al. 2020, L_out): reference loop (batch and reference sets), PML parity
(and where PML departs from the paper), errors."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from mbdl.functional.supcon import supcon_loss
from mbdl.losses.supcon import SupConLoss
from reference_losses_b import LAYOUTS, batch


def ref_supcon(
    embeddings, labels, ref_emb=None, ref_labels=None, *, temperature=0.1, anchor_offset=None
):
    """Khosla et al. eq. 2 (``L_out``), one anchor at a time: ``-1/|P(i)| sum_{p in P(i)}
    log(e^{S_ip/T} / sum_{a in A(i)} e^{S_ia/T})``, averaged over the anchors with a positive."""

    def cos(a, b):
        dot = sum(p * q for p, q in zip(a, b, strict=True))
        return dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    xs, ys = embeddings.tolist(), labels.tolist()
    if ref_emb is None:
        zs, zl, itself = xs, ys, list(range(len(xs)))
    else:
        zs, zl = ref_emb.tolist(), ref_labels.tolist()
        itself = [None if anchor_offset is None else anchor_offset + i for i in range(len(xs))]
    losses = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        others = [a for a in range(len(zs)) if a != itself[i]]
        positives = [p for p in others if zl[p] == y]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(cos(x, zs[a]) / temperature) for a in others))
        log_probs = [cos(x, zs[p]) / temperature - log_denominator for p in positives]
        losses.append(-sum(log_probs) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [1, 2, 5, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed, batch_size, layout):
    x, labels = batch(seed, batch_size, layout)
    for temperature in (0.1, 0.5, 0.05):
        got = supcon_loss(x, labels, temperature=temperature)
        assert got.dtype == torch.float64
        expected = ref_supcon(x, labels, temperature=temperature)
        assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("anchor_offset", [None, 0, 3])
def test_matches_reference_loop_with_a_reference_set(layout, anchor_offset):
    x, labels = batch(5, 12, layout)
    memory, memory_labels = batch(6, 9, layout)
    if anchor_offset is None:  # a reference set without the anchors (e.g. other GPUs' items)
        ref, ref_labels = memory, memory_labels
    else:  # the batch sits inside the reference set (cross-batch memory)
        ref = torch.cat([memory[:anchor_offset], x, memory[anchor_offset:]])
        ref_labels = torch.cat(
            [memory_labels[:anchor_offset], labels, memory_labels[anchor_offset:]]
        )
    got = supcon_loss(x, labels, ref, ref_labels, temperature=0.2, anchor_offset=anchor_offset)
    expected = ref_supcon(x, labels, ref, ref_labels, temperature=0.2, anchor_offset=anchor_offset)
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_batch_as_its_own_reference_set_is_no_reference_set():
    x, labels = batch(7, 16, "random")
    torch.testing.assert_close(
        SupConLoss()(x, labels, x, labels, anchor_offset=0), SupConLoss()(x, labels)
    )


@pytest.mark.parametrize("classes", ["p_by_k", "pairs_and_triples"])
@pytest.mark.parametrize("temperature", [0.1, 0.07, 0.5])
def test_parity_with_pml_when_every_anchor_has_a_positive(classes, temperature):
    x, labels = batch(13, 24, "p_by_k", dim=8)
    if classes == "pairs_and_triples":
        labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3] * 2 + [4, 4, 5, 5]).roll(3)
    x.requires_grad_(True)
    x_pml = x.detach().clone().requires_grad_(True)
    got = SupConLoss(temperature)(x, labels)
    expected = pml_losses.SupConLoss(temperature=temperature)(x_pml, labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    got.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, x_pml.grad, rtol=1e-7, atol=1e-10)


def test_parity_with_pml_given_a_separate_reference_set():
    x, labels = batch(14, 12, "p_by_k", dim=8)
    ref, _ = batch(15, 18, "random", dim=8)
    ref_labels = labels.repeat(2)[:18]  # every anchor's class is in the reference set
    got = SupConLoss(0.2)(x, labels, ref, ref_labels)
    expected = pml_losses.SupConLoss(temperature=0.2)(x, labels, ref_emb=ref, ref_labels=ref_labels)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_one_class_batch_follows_the_paper_not_pml():
    # no negatives at all: PML returns 0; L_out is still >= log |P(i)| (Jensen) and pulls in
    # the least similar positives
    x, labels = batch(3, 6, "one_class")
    x.requires_grad_(True)
    got = supcon_loss(x, labels)
    assert pml_losses.SupConLoss()(x, labels).item() == 0.0
    assert got.item() == pytest.approx(ref_supcon(x, labels), rel=1e-9)
    assert got.item() >= math.log(5)
    got.backward()
    assert x.grad.abs().sum() > 0


def test_no_positive_anywhere_is_a_connected_zero():
    x, labels = batch(3, 6, "singletons")
    x.requires_grad_(True)
    loss = supcon_loss(x, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # an anchor that is the whole reference set (no A(i)) stays finite too
    alone = supcon_loss(x[:1], labels[:1], x[:1], labels[:1], anchor_offset=0)
    assert alone.item() == 0.0


def test_anchors_without_positive_are_left_out_of_the_mean():
    x, labels = batch(4, 12, "p_by_k")
    labels[-3:] = torch.tensor([100, 101, 102])  # three anchors without a positive
    got = supcon_loss(x, labels).item()
    with_positive = ref_supcon(x, labels)  # mean over the 9 anchors with a positive
    assert got == pytest.approx(with_positive, rel=1e-9)
    assert got != pytest.approx(with_positive * 9 / 12, rel=1e-3)


def test_gradcheck_and_half_precision():
    x, labels = batch(2, 8, "random", dim=4)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: supcon_loss(e, labels, temperature=0.5), (x,))
    low = supcon_loss(x.detach().bfloat16(), labels)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(supcon_loss(x.detach(), labels).item(), rel=5e-2)


def test_declaration_and_value_errors():
    assert (SupConLoss.name, SupConLoss.needs, SupConLoss.accepts_ref) == ("supcon", (), True)
    param, values = SupConLoss.search_grid
    assert param == "temperature" and values[0] == SupConLoss().temperature == 0.1
    assert all(SupConLoss(**{param: v}).temperature == v for v in values)
    assert repr(SupConLoss(0.2)) == "SupConLoss(temperature=0.2)"
    for bad in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            SupConLoss(bad)
    x, labels = batch(0, 6, "p_by_k", dim=4)
    with pytest.raises(ValueError, match="anchor_offset=4 puts the 6 anchors outside"):
        SupConLoss()(x, labels, x, labels, anchor_offset=4)
