"""The additive angular margin loss of Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin
Loss for Deep Face Recognition", CVPR 2019 (eq. 3, "ArcFace").

With one learnable proxy (class weight) ``w_c`` per class, ``theta_ic`` the angle between ``x_i``
and ``w_c``, additive angular margin ``m`` (radians) and scale ``s``:

    l_i = -log( exp(s cos(theta_iy + m)) / (exp(s cos(theta_iy + m)) + sum_{c != y_i} exp(s cos theta_ic)) )
    L   = (1/B) sum_i l_i,   y = y_i

This is the paper's formula for every angle. pytorch-metric-learning's ``ArcFaceLoss`` (margin in
degrees) and the authors' code replace ``cos(theta + m)`` by ``cos(theta) - m sin(m)`` where
``theta > pi - m`` (to keep the target logit decreasing); the paper leaves that interval alone
("almost never reached during training"), so the two agree whenever every ``theta_iy <= pi - m``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbdl.functional.checks import check_number
from mbdl.functional.normsoftmax import proxy_cosines, proxy_softmax_loss


def check_arcface_options(margin: float, scale: float) -> None:
    """Raise ``ValueError`` unless ``0 <= margin < pi/2`` (radians) and ``scale > 0``."""
    if not (math.isfinite(margin) and 0 <= margin < math.pi / 2):
        hint = ""
        if math.isfinite(margin) and margin >= math.pi / 2:
            hint = (
                f" (pytorch-metric-learning's ArcFaceLoss takes degrees: {margin} degrees is "
                f"{math.radians(margin):.4g} radians)"
            )
        raise ValueError(f"margin must be in radians, in [0, pi/2); got {margin}{hint}")
    check_number("scale", scale, above=0)


def arcface_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    *,
    margin: float = 0.5,
    scale: float = 64.0,
) -> Tensor:
    """ArcFace (Deng et al., CVPR 2019): cross-entropy of ``s cos(theta_ic + m [c = y_i])``.

    See the module docstring for the formula; ``proxies`` is the ``C x d`` class-weight matrix.
    The value uses the exact angle; its gradient is that of the target cosine clamped to
    ``[-1 + eps, 1 - eps]``, so it stays finite when an embedding points exactly at (or away from)
    its proxy.
    """
    check_arcface_options(margin, scale)
    cosines = proxy_cosines(embeddings, labels, proxies)
    rows = labels.long()[:, None]
    target = cosines.gather(1, rows)
    limit = 1 - torch.finfo(cosines.dtype).eps
    safe = torch.acos(target.clamp(-limit, limit))  # finite gradient at theta = 0 and pi
    theta = safe + (torch.acos(target.clamp(-1, 1)) - safe).detach()  # the exact angle's value
    logits = cosines.scatter(1, rows, torch.cos(theta + margin))
    return proxy_softmax_loss(logits * scale, labels)
