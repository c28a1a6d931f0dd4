"""``MarginLoss``: the module over :func:`mbdl.functional.margin.margin_loss`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mbdl.functional.margin import check_margin_options, margin_loss
from mbdl.losses.base import MetricLoss


class MarginLoss(MetricLoss):
    """Margin loss with distance-weighted negative sampling (Wu et al., ICCV 2017):
    ``[alpha + D_ij - beta]_+`` for positives, ``[alpha - D_ik + beta]_+`` for the sampled
    negatives, summed over triplets and divided by the number of non-zero terms, plus
    ``nu * beta`` (see :mod:`mbdl.functional.margin`).

    ``beta`` is learnable when ``learn_beta`` and one value per class when ``beta_per_class``
    (then ``num_classes`` is required and labels must be in ``[0, num_classes)``). ``needs``
    lists ``num_classes`` so the trainer always passes it; it is ignored unless
    ``beta_per_class``. ``seed`` makes the sampling deterministic (a private ``torch.Generator``
    per device); ``seed=None`` uses torch's global RNG. ``sampling="all"`` uses every triplet
    instead (PML's ``MarginLoss`` without a miner).
    """

    name = "margin"
    needs = ("num_classes",)
    search_grid = ("alpha", (0.2, 0.1, 0.4))

    def __init__(
        self,
        alpha: float = 0.2,
        beta: float = 1.2,
        learn_beta: bool = True,
        beta_per_class: bool = False,
        num_classes: int | None = None,
        nu: float = 0.0,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        seed: int | None = None,
        sampling: str = "distance_weighted",
    ) -> None:
        super().__init__()
        check_margin_options(alpha, nu, sampling, cutoff, nonzero_loss_cutoff)
        if beta_per_class and not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(
                f"beta_per_class needs num_classes, an integer >= 1; got {num_classes!r}"
            )
        self.alpha = alpha
        self.nu = nu
        self.cutoff = cutoff
        self.nonzero_loss_cutoff = nonzero_loss_cutoff
        self.sampling = sampling
        self.learn_beta = learn_beta
        self.beta_per_class = beta_per_class
        self.num_classes = num_classes
        self.seed = seed
        size = num_classes if beta_per_class and num_classes is not None else 1
        initial = torch.full((size,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator for ``device`` (created on first use), or None without a seed."""
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        anchor_offset: int | None,
    ) -> Tensor:
        return margin_loss(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            beta=self.beta,
            alpha=self.alpha,
            nu=self.nu,
            sampling=self.sampling,
            cutoff=self.cutoff,
            nonzero_loss_cutoff=self.nonzero_loss_cutoff,
            generator=self.generator(embeddings.device),
            anchor_offset=anchor_offset,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta_per_class={self.beta_per_class}, "
            f"learn_beta={self.learn_beta}, nu={self.nu}, sampling={self.sampling!r}, "
            f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}, seed={self.seed}"
        )
