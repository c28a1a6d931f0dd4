"""The proxy-anchor loss of Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning",
CVPR 2020 (eq. 4).

With one learnable proxy ``p_c`` per class, ``s(x, p) = cos(x, p)``, ``P+`` the classes present in
the batch, ``X_c+`` the batch items of class ``c`` and ``X_c-`` the others:

    L = 1/|P+| sum_{c in P+} log(1 + sum_{x in X_c+} exp(-alpha (s(x, p_c) - delta)))
      + 1/C    sum_{c}       log(1 + sum_{x in X_c-} exp( alpha (s(x, p_c) + delta)))

(PML ``ProxyAnchorLoss`` given the same proxies). The proxies are the anchors, so the loss takes
no reference set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbdl.functional.checks import check_embeddings, check_loss_inputs, check_number
from mbdl.functional.multisimilarity import cosine_similarity, log_one_plus_sum_exp


def check_proxyanchor_options(margin: float, alpha: float) -> None:
    """Raise ``ValueError`` unless ``margin`` is finite and ``alpha > 0``."""
    check_number("margin", margin)
    check_number("alpha", alpha, above=0)


def check_proxy_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless every label is in ``[0, num_classes)``."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}) (one proxy per class); "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


def proxy_anchor_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> Tensor:
    """Proxy-anchor loss (Kim et al., CVPR 2020) of a batch against ``proxies`` (``C x d``).

    See the module docstring for the formula. fp16/bf16 are computed in fp32; the proxies are
    cast to the computation dtype (differentiably).
    """
    check_loss_inputs(embeddings, labels)
    check_embeddings(proxies, "proxies")
    if proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"proxies have dimension {proxies.shape[1]} but embeddings have {embeddings.shape[1]}"
        )
    check_proxyanchor_options(margin, alpha)
    num_classes = proxies.shape[0]
    check_proxy_labels(labels, num_classes)
    # C x B layout: every reduction below runs along contiguous memory
    sim = cosine_similarity(proxies, embeddings)
    rows = labels.long()
    cols = torch.arange(labels.shape[0], device=labels.device)
    # positive term: each item is a positive of its own proxy only, so O(B) with scatter
    pos_logits = sim[rows, cols].mul(-alpha).add(alpha * margin)
    shift = torch.zeros(num_classes, dtype=sim.dtype, device=sim.device)
    shift = shift.scatter_reduce(0, rows, pos_logits.detach(), reduce="amax")
    pos_sum = torch.exp(-shift).index_add(0, rows, torch.exp(pos_logits - shift[rows]))
    present = torch.zeros(num_classes, dtype=torch.bool, device=sim.device)
    present[rows] = True
    pos_term = (shift + pos_sum.log()) * present
    # negative term: dense over the C x B matrix, own-class entries masked out
    negative = torch.ones_like(sim, dtype=torch.bool)
    negative[rows, cols] = False
    neg_term = log_one_plus_sum_exp(sim.mul(alpha).add(alpha * margin), negative, dim=1)
    return pos_term.sum() / present.sum().clamp_min(1) + neg_term.sum() / num_classes
