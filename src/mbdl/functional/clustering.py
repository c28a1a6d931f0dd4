"""Clustering metrics from the class-by-cluster contingency table.

- NMI (arithmetic normalisation, as scikit-learn's ``normalized_mutual_info_score`` default):
  ``NMI = I(Y; C) / ((H(Y) + H(C)) / 2)`` with ``I = sum_ij n_ij/n log(n n_ij / (a_i b_j))``.
- Pair-counting F1 (Song et al., "Deep Metric Learning via Lifted Structured Feature
  Embedding", CVPR 2016): a pair of items is positive when both share a class and predicted
  positive when both share a cluster. From the contingency table ``n_ij`` with class sizes
  ``a_i`` and cluster sizes ``b_j``: ``TP = sum_ij C(n_ij, 2)``, precision ``TP / sum_j C(b_j, 2)``,
  recall ``TP / sum_i C(a_i, 2)``, ``F1 = 2 P R / (P + R)``. No pair is ever enumerated.
  Precision (recall) is 0 when no pair is predicted (actually) positive; F1 is then 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def contingency_counts(labels: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse contingency table: ``(n_ij, a_i, b_j)`` for every non-empty (class, cluster) cell.

    ``n_ij`` is the cell count, ``a_i`` its class size and ``b_j`` its cluster size (all int64,
    one entry per non-empty cell). O(N) memory, never the dense classes x clusters table.
    """
    if labels.shape != clusters.shape or labels.dim() != 1:
        raise ValueError(
            f"labels and clusters must be 1-D of the same length; got {tuple(labels.shape)} "
            f"and {tuple(clusters.shape)}"
        )
    _, label_index, class_sizes = torch.unique(
        labels.cpu(), return_inverse=True, return_counts=True
    )
    _, cluster_index, cluster_sizes = torch.unique(
        clusters.cpu(), return_inverse=True, return_counts=True
    )
    num_clusters = cluster_sizes.numel()
    cells, cell_counts = torch.unique(
        label_index * num_clusters + cluster_index, return_counts=True
    )
    return cell_counts, class_sizes[cells // num_clusters], cluster_sizes[cells % num_clusters]


def contingency_table(labels: Tensor, clusters: Tensor) -> Tensor:
    """Dense ``table[i, j]`` = items of the i-th distinct label in the j-th distinct cluster."""
    _, label_index = torch.unique(labels.cpu(), return_inverse=True)
    _, cluster_index = torch.unique(clusters.cpu(), return_inverse=True)
    contingency_counts(labels, clusters)  # validates the shapes
    num_labels = int(label_index.max()) + 1 if labels.numel() else 0
    num_clusters = int(cluster_index.max()) + 1 if clusters.numel() else 0
    flat = label_index * num_clusters + cluster_index
    counts = torch.bincount(flat, minlength=num_labels * num_clusters)
    return counts.view(num_labels, num_clusters)


def _entropy(sizes: Tensor, total: float) -> float:
    p = sizes.double() / total
    return float(-(p * p.log()).sum())


def normalized_mutual_info(labels: Tensor, clusters: Tensor) -> float:
    """NMI of a clustering against the labels, arithmetic normalisation (sklearn's default)."""
    n_ij, a_i, b_j = contingency_counts(labels, clusters)
    class_sizes = torch.unique(labels.cpu(), return_counts=True)[1]
    cluster_sizes = torch.unique(clusters.cpu(), return_counts=True)[1]
    if class_sizes.numel() == cluster_sizes.numel() == 1 or labels.numel() == 0:
        return 1.0  # sklearn's convention: both are a single group, a perfect (trivial) match
    n = float(labels.numel())
    n_ij, a_i, b_j = n_ij.double(), a_i.double(), b_j.double()
    mutual_info = max(float((n_ij / n * (n * n_ij / (a_i * b_j)).log()).sum()), 0.0)
    if mutual_info == 0.0:
        return 0.0
    mean_entropy = (_entropy(class_sizes, n) + _entropy(cluster_sizes, n)) / 2
    return min(mutual_info / mean_entropy, 1.0)  # I <= min(H) <= mean H: only rounding exceeds 1


def _pairs(counts: Tensor) -> float:
    counts = counts.double()
    return float((counts * (counts - 1) / 2).sum())


def pair_f1(labels: Tensor, clusters: Tensor) -> float:
    """Pair-counting F1 of a clustering against the labels, from the contingency counts."""
    n_ij, _, _ = contingency_counts(labels, clusters)
    true_positive = _pairs(n_ij)
    predicted_positive = _pairs(torch.unique(clusters.cpu(), return_counts=True)[1])
    actual_positive = _pairs(torch.unique(labels.cpu(), return_counts=True)[1])
    precision = true_positive / predicted_positive if predicted_positive > 0 else 0.0
    recall = true_positive / actual_positive if actual_positive > 0 else 0.0
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def expected_mutual_info(class_sizes: Tensor, cluster_sizes: Tensor, n: int) -> float:
    """E[I(Y; C)] over random clusterings with these class and cluster sizes (hypergeometric
    model of Vinh, Epps and Bailey, "Information Theoretic Measures for Clusterings
    Comparison", JMLR 2010):

    ``E[I] = sum_ij sum_{n_ij} n_ij/n log(n n_ij / (a_i b_j)) P(n_ij | a_i, b_j, n)``,
    ``n_ij`` from ``max(1, a_i + b_j - n)`` to ``min(a_i, b_j)``. The terms depend on the sizes
    only, so each distinct ``(a, b)`` pair is computed once and weighted by its multiplicity.
    """
    a_values, a_counts = torch.unique(class_sizes.cpu().long(), return_counts=True)
    b_values, b_counts = torch.unique(cluster_sizes.cpu().long(), return_counts=True)
    b = b_values.double()
    b_weight = b_counts.double()
    lg = torch.lgamma
    nn = torch.tensor(float(n), dtype=torch.float64)
    total = 0.0
    for a_int, a_count in zip(a_values.tolist(), a_counts.tolist(), strict=True):
        a = torch.tensor(float(a_int), dtype=torch.float64)
        top = min(a_int, int(b_values.max()))
        # log of a_i! b_j! (n - a_i)! (n - b_j)! / n!, per b
        fixed = lg(a + 1) + lg(b + 1) + lg(nn - a + 1) + lg(nn - b + 1) - lg(nn + 1)
        for start in range(1, top + 1, 4096):
            k = torch.arange(start, min(top, start + 4095) + 1, dtype=torch.float64)
            kk, bb = k.unsqueeze(0), b.unsqueeze(1)
            valid = (kk <= torch.minimum(a, bb)) & (kk >= a + bb - nn)
            log_p = (
                fixed.unsqueeze(1)
                - lg(kk + 1)
                - lg((a - kk).clamp_min(0) + 1)
                - lg((bb - kk).clamp_min(0) + 1)
                - lg((nn - a - bb + kk).clamp_min(0) + 1)
            )
            term = kk / nn * torch.log(nn * kk / (a * bb)) * torch.exp(log_p)
            term = torch.where(valid, term, torch.zeros_like(term))
            total += a_count * float((term.sum(dim=1) * b_weight).sum())
    return total


def adjusted_mutual_info(labels: Tensor, clusters: Tensor) -> float:
    """AMI, arithmetic normalisation (scikit-learn's ``adjusted_mutual_info_score`` default):
    ``AMI = (I - E[I]) / ((H(Y) + H(C)) / 2 - E[I])``; 0 for a clustering no better than chance
    given its cluster sizes, 1 for a perfect match (Vinh, Epps and Bailey, JMLR 2010)."""
    n_ij, a_i, b_j = contingency_counts(labels, clusters)
    class_sizes = torch.unique(labels.cpu(), return_counts=True)[1]
    cluster_sizes = torch.unique(clusters.cpu(), return_counts=True)[1]
    if class_sizes.numel() == cluster_sizes.numel() and class_sizes.numel() <= 1:
        return 1.0  # sklearn's convention: no split on either side is a perfect match
    n = labels.numel()
    nf = float(n)
    n_ij, a_i, b_j = n_ij.double(), a_i.double(), b_j.double()
    mutual_info = max(float((n_ij / nf * (nf * n_ij / (a_i * b_j)).log()).sum()), 0.0)
    expected = expected_mutual_info(class_sizes, cluster_sizes, n)
    mean_entropy = (_entropy(class_sizes, nf) + _entropy(cluster_sizes, nf)) / 2
    denominator = mean_entropy - expected
    eps = 2.220446049250313e-16
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    return min((mutual_info - expected) / denominator, 1.0)  # above 1 only by rounding
