"""The normalised softmax loss of Zhai and Wu, "Classification is a Strong Baseline for Deep Metric
Learning", BMVC 2019 (their eq. 2, "NormSoftmax").

With one learnable proxy (class weight) ``w_c`` per class, ``cos(x, w) = x.w / (|x| |w|)`` and
temperature ``T``:

    l_i = -log( exp(cos(x_i, w_{y_i}) / T) / sum_{c=1}^{C} exp(cos(x_i, w_c) / T) )
    L   = (1/B) sum_i l_i

(PML ``NormalizedSoftmaxLoss`` given the same weights, transposed, and L2-normalised embeddings:
PML normalises the weights only). It is the margin-free base of the CosFace and ArcFace losses,
whose kernels reuse :func:`proxy_cosines` and :func:`proxy_softmax_loss` from here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbdl.functional.checks import check_embeddings, check_loss_inputs, check_number
from mbdl.functional.multisimilarity import cosine_similarity
from mbdl.functional.proxyanchor import check_proxy_labels


def check_normsoftmax_options(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature`` is a finite number > 0."""
    check_number("temperature", temperature, above=0)


def proxy_cosines(embeddings: Tensor, labels: Tensor, proxies: Tensor) -> Tensor:
    """Validate a batch against ``proxies`` (``C x d``) and return ``cos(x_i, w_c)`` (``B x C``).

    Labels must be in ``[0, C)``; fp16/bf16 are computed in fp32, the proxies are cast to the
    computation dtype (differentiably).
    """
    check_loss_inputs(embeddings, labels)
    check_embeddings(proxies, "proxies")
    if proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"proxies have dimension {proxies.shape[1]} but embeddings have {embeddings.shape[1]}"
        )
    check_proxy_labels(labels, proxies.shape[0])
    return cosine_similarity(embeddings, proxies)


def proxy_softmax_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``(1/B) sum_i -log softmax(logits_i)[y_i]`` (``logits``: ``B x C``); a connected 0 when
    ``B = 0``."""
    total = torch.nn.functional.cross_entropy(logits, labels.long(), reduction="sum")
    return total / max(logits.shape[0], 1)


def normsoftmax_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, *, temperature: float = 0.05
) -> Tensor:
    """NormSoftmax (Zhai & Wu, BMVC 2019): cross-entropy of ``cos(x_i, w_c) / temperature``.

    See the module docstring for the formula; ``proxies`` is the ``C x d`` class-weight matrix.
    """
    check_normsoftmax_options(temperature)
    cosines = proxy_cosines(embeddings, labels, proxies)
    return proxy_softmax_loss(cosines / temperature, labels)
