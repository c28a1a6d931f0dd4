"""The loss contract: what every loss must satisfy, run over the whole registry.

Parametrised over ``mbdl.losses.LOSSES`` (every built-in found in the package) and the example
plugins of tests/example_loss_plugin.py, so a new loss gets these checks without an edit here:
bad inputs, gradcheck, permutation and relabel invariance, degenerate batches, a connected zero
when there is no pair, fp16/bf16 inputs, ``ref_emb`` equivalence, cross-batch memory (or its
refusal), a ``state_dict`` round trip, and one validation per call. Each loss's own file keeps
only what is specific to it (its reference loop from the paper, pytorch-metric-learning parity).

Every check is a plain function of a loss factory, so the last tests can show that each check
fails on a loss deliberately broken in the way it guards against.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.gradcheck import GradcheckError

import mbdl.functional.checks as checks
from mbdl.functional.reductions import upcast
from mbdl.losses import LOSSES, FunctionalLoss, MetricLoss, build_loss, loss_class
from mbdl.losses.xbm import CrossBatchMemory

NUM_CLASSES = 5
DIM = 8
PLUGINS = ("example_loss_plugin:SquaredContrastiveLoss", "example_loss_plugin:CenterLoss")
ALL = (*LOSSES.names(), *PLUGINS)
# Options that make a stochastic loss a function of its inputs (margin's distance-weighted
# sampling draws the negatives at random; its own file tests the sampling).
DETERMINISTIC: dict[str, dict[str, object]] = {"margin": {"sampling": "all"}}

Factory = Callable[..., nn.Module]


def factory(name: str) -> Factory:
    """``make(seed=0)``: the loss ``name`` with the trainer's arguments, parameters seeded."""
    sizes = {"num_classes": NUM_CLASSES, "embedding_dim": DIM}
    extra = {key: sizes[key] for key in getattr(loss_class(name), "needs", ())}

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_loss(name, **DETERMINISTIC.get(name, {}), **extra)

    return make


def batch(seed: int, size: int = 10, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Gaussian embeddings, labels cycling over the classes (two or more items per class)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, DIM, generator=g, dtype=dtype)
    labels = torch.arange(size) % NUM_CLASSES
    return x, labels[torch.randperm(size, generator=g)]


def accepts_ref(make: Factory) -> bool:
    return bool(getattr(make(), "accepts_ref", True))


# ---------------------------------------------------------------------------------- the checks

_X = torch.randn(6, DIM, dtype=torch.float64)
_Y = torch.tensor([0, 0, 1, 1, 2, 2])
BAD_INPUTS: list[tuple[tuple[object, ...], dict[str, object], str]] = [
    ((_X.clone().index_fill_(0, torch.tensor([2]), math.nan), _Y), {}, "NaN or Inf"),
    ((_X.clone().index_fill_(0, torch.tensor([2]), math.inf), _Y), {}, "NaN or Inf"),
    ((_X[:, 0], _Y), {}, "2-D"),
    ((_X[:, :1], _Y), {}, "at least 2 dimensions"),
    ((_X.long(), _Y), {}, "floating point"),
    ((_X, _Y[:5]), {}, "5 entries"),
    ((_X, _Y.float()), {}, "integers"),
    ((_X, _Y.bool()), {}, "integers"),
    ((_X, _Y[None]), {}, "1-D"),
    ((_X, _Y, _X), {}, "together"),
    ((_X, _Y, torch.randn(6, 3, dtype=torch.float64), _Y), {}, "dimension 3"),
    ((_X, _Y, _X.clone().fill_(math.nan), _Y), {}, "ref_emb contain NaN"),
    ((_X, _Y, _X, _Y[:4]), {}, "ref_labels has 4 entries"),
]


def check_bad_inputs(make: Factory) -> None:
    """Each bad input raises one ``ValueError`` naming the problem."""
    loss = make()
    cases = list(BAD_INPUTS)
    if accepts_ref(make):
        cases.append(((_X, _Y, _X, _Y), {"anchor_offset": 3}, "anchor_offset"))
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            loss(*args, **kwargs)
        assert "\n" not in str(info.value)


def check_gradcheck(make: Factory) -> None:
    """The gradients with respect to the embeddings, the loss's own parameters (proxies, learnable
    margins) and, where it takes one, the reference set match finite differences (float64)."""
    loss = make().double()
    x, labels = batch(1, size=8)
    names = [name for name, _ in loss.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in loss.named_parameters()]

    def with_params(embeddings: Tensor, *values: Tensor) -> Tensor:
        state = dict(zip(names, values, strict=True))
        return torch.func.functional_call(loss, state, (embeddings, labels))

    inputs = (x.requires_grad_(True), *params)
    torch.autograd.gradcheck(with_params, inputs, eps=1e-6, atol=1e-5)
    if getattr(loss, "accepts_ref", True):
        ref, ref_labels = batch(2, size=6)
        torch.autograd.gradcheck(
            lambda e, r: loss(e, labels, r, ref_labels), (x, ref.requires_grad_(True)), atol=1e-5
        )


def stable_shuffle(labels: Tensor, generator: torch.Generator) -> Tensor:
    """A random order of the batch that keeps the items of each class in their order (losses
    such as N-pair use the first items of a class; which class comes first must not matter)."""
    shuffled = torch.randperm(len(labels), generator=generator)
    order = shuffled.clone()
    for label in labels.unique():
        slots = (labels[shuffled] == label).nonzero().squeeze(1)
        order[slots] = (labels == label).nonzero().squeeze(1)
    return order


def relabelled(loss: nn.Module, make: Factory, mapping: Tensor) -> nn.Module:
    """A copy of ``loss`` for labels renamed ``c -> mapping[c]``: state with one row per class
    (proxies, centres, per-class betas) follows its class."""
    state = {}
    for key, value in loss.state_dict().items():
        if value.dim() >= 1 and value.shape[0] == NUM_CLASSES:
            moved = value.clone()
            moved[mapping] = value
            value = moved
        state[key] = value
    copy = make(seed=1)
    copy.load_state_dict(state)
    return copy.to(torch.float64)


def check_permutation_and_relabel_invariance(make: Factory) -> None:
    """Reordering the batch or renaming its classes leaves the loss unchanged."""
    g = torch.Generator().manual_seed(7)
    loss = make().double()
    for seed in range(3):
        x, labels = batch(seed, size=12)
        value = loss(x, labels).item()
        order = stable_shuffle(labels, g)
        assert loss(x[order], labels[order]).item() == pytest.approx(value, rel=1e-9, abs=1e-12)
        mapping = torch.randperm(NUM_CLASSES, generator=g)
        renamed = relabelled(loss, make, mapping)(x, mapping[labels]).item()
        assert renamed == pytest.approx(value, rel=1e-9, abs=1e-12)
        if "num_classes" not in getattr(loss, "needs", ()):  # any integers name classes
            assert loss(x, labels * 7 + 1000).item() == pytest.approx(value, rel=1e-9, abs=1e-12)


def _value_and_grad(loss: nn.Module, x: Tensor, labels: Tensor, *ref: Tensor, **kw: object):
    x = x.clone().requires_grad_(True)
    value = loss(x, labels, *ref, **kw)
    assert value.requires_grad, "the loss is not connected to the graph"
    value.backward()
    assert x.grad is not None
    return value, x.grad


def check_degenerate_batches(make: Factory) -> None:
    """Exact duplicates, zero vectors, one class, all-distinct classes: finite loss and gradient."""
    loss = make().double()
    base = batch(3, size=4)[0]
    cases = [
        (torch.cat([base, base, torch.zeros(2, DIM, dtype=torch.float64)]), torch.arange(10) % 4),
        (base, torch.zeros(4, dtype=torch.long)),
        (base, torch.arange(4)),
    ]
    for x, labels in cases:
        value, grad = _value_and_grad(loss, x, labels)
        assert torch.isfinite(value) and torch.isfinite(grad).all()


def check_connected_zero(make: Factory) -> None:
    """No pair at all (one item; one anchor against only itself): the loss is exactly 0, still
    connected to the graph, with a finite (zero) gradient."""
    loss = make().double()
    x = batch(4, size=1)[0]
    labels = torch.tensor([3])
    for ref in ((), (x, labels)):
        kwargs = {"anchor_offset": 0} if ref else {}
        value, grad = _value_and_grad(loss, x, labels, *ref, **kwargs)
        assert value.item() == 0.0 and value.requires_grad
        assert torch.isfinite(grad).all() and not grad.any()


def check_half_precision(make: Factory) -> None:
    """fp16/bf16 embeddings: a float32 loss equal to the same (rounded) inputs in float32, and a
    finite gradient in the input's dtype."""
    loss = make()
    x, labels = batch(5, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        half = x.to(dtype).requires_grad_(True)
        value = loss(half, labels)
        assert value.dtype == torch.float32
        value.backward()
        assert half.grad is not None and half.grad.dtype == dtype
        assert torch.isfinite(half.grad.float()).all()
        full = loss(half.detach().float(), labels)
        assert value.item() == pytest.approx(full.item(), rel=1e-4, abs=1e-6)


def check_reference_set_of_the_batch(make: Factory) -> None:
    """``ref_emb`` = the batch itself with ``anchor_offset=0`` equals no reference set."""
    loss = make().double()
    x, labels = batch(6)
    value, grad = _value_and_grad(loss, x, labels)
    same = x.clone().requires_grad_(True)  # the anchors and the reference set: one tensor
    with_ref = loss(same, labels, same, labels, anchor_offset=0)
    with_ref.backward()
    assert with_ref.item() == pytest.approx(value.item(), rel=1e-9, abs=1e-12)
    assert same.grad is not None
    torch.testing.assert_close(same.grad, grad, rtol=1e-7, atol=1e-10)


def check_cross_batch_memory(make: Factory) -> None:
    """Under cross-batch memory the second batch's loss is the loss against [batch; memory]."""
    loss = make()
    memory = CrossBatchMemory(loss, memory_size=32, embedding_dim=DIM).train()
    x1, y1 = batch(7, dtype=torch.float32)
    x2, y2 = batch(8, dtype=torch.float32)
    assert memory(x1, y1).item() == pytest.approx(loss(x1, y1).item(), rel=1e-6)
    x2 = x2.requires_grad_(True)
    value = memory(x2, y2)
    expected = loss(x2, y2, torch.cat([x2, x1]), torch.cat([y2, y1]), anchor_offset=0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    value.backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()
    # and the reference set is used: anchors against another batch give another value
    against_other = loss(x2.detach(), y2, x1, y1).item()
    assert against_other != pytest.approx(loss(x2.detach(), y2).item(), rel=1e-3)


def check_refuses_reference_set(make: Factory) -> None:
    """A loss that takes no reference set says so, and cross-batch memory refuses it."""
    x, labels = batch(9)
    with pytest.raises(ValueError, match="reference set"):
        make()(x, labels, x, labels)
    with pytest.raises(ValueError, match="reference set"):
        CrossBatchMemory(make(), memory_size=8, embedding_dim=DIM)


def check_state_dict_round_trip(make: Factory) -> None:
    """Saved and loaded into a freshly built loss (other initial parameters), the loss is equal."""
    trained = make(seed=0).double()
    with torch.no_grad():
        for parameter in trained.parameters():  # as after some training steps
            parameter.add_(0.05 * torch.randn_like(parameter))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored = make(seed=1).double()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x, labels = batch(10)
    assert restored(x, labels).item() == trained(x, labels).item()


# ------------------------------------------------------------------------- over the registry


def test_the_registry_holds_every_built_in_loss() -> None:
    names = LOSSES.names()
    assert len(names) >= 8 and len(set(names)) == len(names)
    for name in names:
        assert loss_class(name).name == name


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs(name: str) -> None:
    check_bad_inputs(factory(name))


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name: str) -> None:
    check_gradcheck(factory(name))


@pytest.mark.parametrize("name", ALL)
def test_permutation_and_relabel_invariance(name: str) -> None:
    check_permutation_and_relabel_invariance(factory(name))


@pytest.mark.parametrize("name", ALL)
def test_degenerate_batches(name: str) -> None:
    check_degenerate_batches(factory(name))


@pytest.mark.parametrize("name", ALL)
def test_connected_zero_without_pairs(name: str) -> None:
    make = factory(name)
    if not accepts_ref(make):
        pytest.skip("its anchors are class proxies/centres: every item has a valid pair")
    check_connected_zero(make)


@pytest.mark.parametrize("name", ALL)
def test_half_precision_inputs(name: str) -> None:
    check_half_precision(factory(name))


@pytest.mark.parametrize("name", ALL)
def test_reference_set(name: str) -> None:
    make = factory(name)
    if accepts_ref(make):
        check_reference_set_of_the_batch(make)
        check_cross_batch_memory(make)
    else:
        check_refuses_reference_set(make)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name: str) -> None:
    check_state_dict_round_trip(factory(name))


@pytest.mark.parametrize("name", LOSSES.names())
def test_a_module_call_validates_its_inputs_once(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = checks.check_embeddings

    def counting(embeddings: Tensor, what: str = "embeddings") -> None:
        calls.append(what)
        original(embeddings, what)

    monkeypatch.setattr(checks, "check_embeddings", counting)
    loss = factory(name)()
    x, labels = batch(11)
    loss(x, labels)
    assert calls.count("embeddings") == 1
    if getattr(loss, "accepts_ref", True):
        calls.clear()
        loss(x, labels, x, labels, anchor_offset=0)
        assert calls.count("embeddings") == 1 and calls.count("ref_emb") == 1
    # the kernel, called directly as the functional API, still validates
    if isinstance(loss, FunctionalLoss):
        with pytest.raises(ValueError, match="NaN or Inf"):
            type(loss).loss_function(x.clone().fill_(math.nan), labels, None, None)


# ------------------------------------------------ the checks fail on deliberately broken losses


class _PairLoss(MetricLoss):
    """A correct small pair loss: mean squared distance of positive pairs."""

    def pair_terms(self, x: Tensor, ref: Tensor, labels: Tensor, ref_labels: Tensor, offset):
        from mbdl.functional.pairs import pair_masks

        positive, _ = pair_masks(labels, ref_labels, offset)
        diff = upcast(x)[:, None, :] - upcast(ref)[None, :, :]
        return torch.where(positive, diff.square().sum(-1), 0.0), positive

    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        ref = embeddings if ref_emb is None else ref_emb
        ref_labels = labels if ref_labels is None else ref_labels
        offset = 0 if ref_emb is None else anchor_offset
        terms, positive = self.pair_terms(embeddings, ref, labels, ref_labels, offset)
        return terms.sum() / positive.sum().clamp_min(1)


class _PositionDependent(_PairLoss):
    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        weights = torch.arange(1, len(labels) + 1, dtype=upcast(embeddings).dtype)
        return super().compute(
            embeddings * weights[:, None].to(embeddings.dtype), labels, None, None, None
        )


class _LabelValueDependent(_PairLoss):
    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        return super().compute(embeddings, labels, ref_emb, ref_labels, anchor_offset) * (
            1 + labels.max()
        )


class _Unvalidated(nn.Module):
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None, anchor_offset=None):
        return upcast(embeddings).square().mean()


class _WrongGradient(_PairLoss):
    class _Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        return super().compute(self._Doubled.apply(embeddings), labels, None, None, None)


class _DisconnectedZero(_PairLoss):
    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        value = super().compute(embeddings, labels, ref_emb, ref_labels, anchor_offset)
        return value if value.item() != 0 else torch.zeros((), dtype=value.dtype)


class _HalfPrecision(_PairLoss):
    def pair_terms(self, x, ref, labels, ref_labels, offset):
        from mbdl.functional.pairs import pair_masks

        positive, _ = pair_masks(labels, ref_labels, offset)
        diff = x[:, None, :] - ref[None, :, :]  # no upcast: the loss stays in fp16/bf16
        return torch.where(positive, diff.square().sum(-1), 0.0), positive


class _IgnoresReferenceSet(_PairLoss):
    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        return super().compute(embeddings, labels, None, None, None)


class _UnsavedParameter(_PairLoss):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.rand(()) + 0.5  # a plain attribute, not a parameter or buffer

    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        return self.scale * super().compute(embeddings, labels, ref_emb, ref_labels, anchor_offset)


class _IgnoresAnchorOffset(_PairLoss):
    def compute(self, embeddings, labels, ref_emb, ref_labels, anchor_offset):
        if ref_emb is None:
            return super().compute(embeddings, labels, None, None, None)
        return super().compute(embeddings, labels, ref_emb, ref_labels, None)  # pairs with itself


class _NaNAtZeroDistance(_PairLoss):
    def pair_terms(self, x, ref, labels, ref_labels, offset):
        terms, positive = super().pair_terms(x, ref, labels, ref_labels, offset)
        return terms.sqrt(), positive  # the gradient of sqrt at 0 is infinite


BROKEN: list[tuple[Callable[[Factory], None], type[nn.Module]]] = [
    (check_reference_set_of_the_batch, _IgnoresAnchorOffset),
    (check_degenerate_batches, _NaNAtZeroDistance),
    (check_permutation_and_relabel_invariance, _PositionDependent),
    (check_permutation_and_relabel_invariance, _LabelValueDependent),
    (check_bad_inputs, _Unvalidated),
    (check_gradcheck, _WrongGradient),
    (check_connected_zero, _DisconnectedZero),
    (check_half_precision, _HalfPrecision),
    (check_cross_batch_memory, _IgnoresReferenceSet),
    (check_state_dict_round_trip, _UnsavedParameter),
]


def test_the_correct_helper_loss_passes_every_check() -> None:
    make = lambda seed=0: _PairLoss()  # noqa: E731
    for check in {check for check, _ in BROKEN}:
        check(make)


@pytest.mark.parametrize(
    ("check", "broken"), BROKEN, ids=[f"{c.__name__}-{b.__name__}" for c, b in BROKEN]
)
def test_each_check_fails_on_a_loss_broken_its_way(check, broken) -> None:
    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return broken()

    with pytest.raises((AssertionError, GradcheckError, pytest.fail.Exception)):
        check(make)
