"""The large margin cosine loss of Wang, Wang, Zhou, Ji, Gong, Zhou, Li, Liu, "CosFace: Large
Margin Cosine Loss for Deep Face Recognition", CVPR 2018 (eq. 4, "CosFace").

With one learnable proxy (class weight) ``w_c`` per class, ``cos_ic = cos(x_i, w_c)``, additive
cosine margin ``m`` and scale ``s``:

    l_i = -log( exp(s (cos_iy - m)) / (exp(s (cos_iy - m)) + sum_{c != y_i} exp(s cos_ic)) )
    L   = (1/B) sum_i l_i,   y = y_i

(PML ``CosFaceLoss`` given the same weights, transposed). With ``m = 0`` and ``s = 1/T`` it is the
NormSoftmax loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbdl.functional.checks import check_number
from mbdl.functional.normsoftmax import proxy_cosines, proxy_softmax_loss


def check_cosface_options(margin: float, scale: float) -> None:
    """Raise ``ValueError`` unless ``margin`` is finite and ``scale > 0``."""
    check_number("margin", margin)
    check_number("scale", scale, above=0)


def cosface_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    *,
    margin: float = 0.35,
    scale: float = 64.0,
) -> Tensor:
    """CosFace (Wang et al., CVPR 2018): cross-entropy of ``s (cos(x_i, w_c) - m [c = y_i])``.

    See the module docstring for the formula; ``proxies`` is the ``C x d`` class-weight matrix.
    """
    check_cosface_options(margin, scale)
    cosines = proxy_cosines(embeddings, labels, proxies)
    target = torch.nn.functional.one_hot(labels.long(), cosines.shape[1]).to(cosines.dtype)
    return proxy_softmax_loss((cosines - margin * target) * scale, labels)
