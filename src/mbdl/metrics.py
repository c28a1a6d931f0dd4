"""The metric registry: every metric declared once, everything else derived from it.

A :class:`Metric` says what a metric is called (its ``metrics.json`` key and its label), which
pure function computes it and what that function needs, whether higher is better, and which
``eval.*`` keys govern it. :func:`mbdl.evaluate.evaluate` computes the registered metrics; the
allowed ``train.select_metric`` values, the run report's labels and order, and ``mbdl compare``'s
summary columns and directions are read from here. Adding a metric is one declaration in
:data:`BUILTIN_METRICS`, its function and its test; an installed package can add one through
the entry-point group ``mbdl.metrics`` (the object it names is a :class:`Metric`).

What a metric's ``function`` receives depends on ``needs``:

- ``"knn"``: the ranked neighbours' labels as ``matches[Q, depth]`` (``True`` where the i-th
  nearest gallery item has the query's class) and returns one score per query (averaged over the
  queries with at least one relevant item). ``depth="K"`` (a family ``name@K``, one key per K in
  ``eval.ks``): ``function(matches, K)``; ``depth="R"``: ``function(matches, num_relevant)``
  with R = the other gallery items of the query's class; ``depth=n``: ``function(matches)``.
- ``"kmeans"``: ``function(labels, clusters) -> float`` on the one seeded k-means clustering.
- ``"pairs"``: ``function(genuine, impostor, fars) -> dict[str, float]`` on the distances of the
  genuine and impostor pairs (several keys; not selectable, as its keys differ in direction).

Imports stay lazy (``function`` is an import path), so :mod:`mbdl.config` can read the registry
without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mbdl.plugins import PluginError, Registry, import_object

Needs = Literal["knn", "kmeans", "pairs"]
NEEDS: tuple[str, ...] = ("knn", "kmeans", "pairs")
FAMILY_SUFFIX = "@K"


@dataclass(frozen=True)
class Metric:
    """One metric (or, for ``needs="pairs"``, one group of keys computed together).

    Args:
        name: the result key; ``"<base>@K"`` declares a family with one key per K in ``eval.ks``.
        label: how reports show it; a family's ``"K"`` is replaced (``"Recall@K"`` -> ``"Recall@4"``).
        function: the pure function (or its ``package.module:name`` import path), see above.
        needs: ``"knn"``, ``"kmeans"`` or ``"pairs"``: what :func:`mbdl.evaluate.evaluate` must
            compute before calling ``function``.
        higher_is_better: the direction; ``None`` for a group whose keys differ (verification).
        eval_keys: the ``eval.*`` config keys that change its value.
        depth: for ``needs="knn"``: ``"K"``, ``"R"`` or a number of neighbours.
        summary: whether ``mbdl compare``'s test table and the report's key figures show it.
        description: one line, shown as the report table row's tooltip.
    """

    name: str
    label: str
    function: str | Callable[..., Any]
    needs: Needs
    higher_is_better: bool | None
    eval_keys: tuple[str, ...] = ()
    depth: int | Literal["K", "R"] | None = None
    summary: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"metric {self.name!r}: needs must be one of {', '.join(NEEDS)}")
        if self.needs == "knn" and (
            self.depth not in ("K", "R") and not (isinstance(self.depth, int) and self.depth >= 1)
        ):
            raise ValueError(f"metric {self.name!r}: a knn metric needs depth 'K', 'R' or n >= 1")
        if (self.depth == "K") != self.is_family:
            raise ValueError(f"metric {self.name!r}: depth 'K' goes with a name ending in '@K'")

    @property
    def is_family(self) -> bool:
        """Whether the name is ``<base>@K`` (one key per K in ``eval.ks``)."""
        return self.name.endswith(FAMILY_SUFFIX)

    @property
    def base(self) -> str:
        """The name without a family's ``@K``."""
        return self.name.removesuffix(FAMILY_SUFFIX) if self.is_family else self.name

    @property
    def selectable(self) -> bool:
        """Whether ``train.select_metric`` may name it (one key per value, with a direction)."""
        return self.higher_is_better is not None and self.needs != "pairs"

    def keys(self, ks: Iterable[int]) -> list[str]:
        """Its result keys for ``eval.ks`` (a family: ``base@K`` for each K; else its name)."""
        if self.is_family:
            return [f"{self.base}@{k}" for k in sorted(set(ks))]
        return [self.name]

    def owns(self, key: str) -> bool:
        """Whether ``key`` is one of its single-valued keys (``recall@7`` for ``recall@K``)."""
        if self.is_family:
            prefix = f"{self.base}@"
            return key.startswith(prefix) and key[len(prefix) :].isdigit()
        return key == self.name

    def label_of(self, key: str) -> str:
        """The label of one of its keys."""
        if self.is_family and self.owns(key):
            return self.label.removesuffix("K") + key.rsplit("@", 1)[1]
        return self.label

    def resolve(self) -> Callable[..., Any]:
        """The function, imported when given as an import path."""
        if isinstance(self.function, str):
            found = import_object(self.function, kind=f"metric {self.name!r} function")
            if not callable(found):
                raise PluginError(f"metric {self.name!r}: {self.function!r} is not callable")
            return found
        return self.function


_RETRIEVAL = ("eval.distance",)
_CLUSTERING = ("eval.kmeans_restarts", "seed")
_PAIRS = ("eval.distance", "eval.verify_far", "eval.verify_max_pairs", "seed")


def _declared(metric: Metric) -> Callable[[], Metric]:
    return lambda: metric


#: The built-in metrics, in the order reports show them.
BUILTIN_METRICS: dict[str, Callable[[], Metric]] = {
    metric.name: _declared(metric)
    for metric in (
        Metric(
            "recall@K",
            "Recall@K",
            "mbdl.functional.retrieval:recall_at_k",
            "knn",
            True,
            (*_RETRIEVAL, "eval.ks"),
            depth="K",
            description="an item of the query's class among its K nearest neighbours",
        ),
        Metric(
            "precision@1",
            "P@1",
            "mbdl.functional.retrieval:precision_at_1",
            "knn",
            True,
            _RETRIEVAL,
            depth=1,
            summary=False,  # equal to Recall@1
            description="the nearest neighbour has the query's class (= Recall@1)",
        ),
        Metric(
            "r_precision",
            "R-Precision",
            "mbdl.functional.retrieval:r_precision",
            "knn",
            True,
            _RETRIEVAL,
            depth="R",
            description="precision among the R nearest neighbours (Musgrave et al. 2020)",
        ),
        Metric(
            "map@r",
            "MAP@R",
            "mbdl.functional.retrieval:map_at_r",
            "knn",
            True,
            _RETRIEVAL,
            depth="R",
            description="mean average precision at R (Musgrave et al. 2020)",
        ),
        Metric(
            "nmi",
            "NMI",
            "mbdl.functional.clustering:normalized_mutual_info",
            "kmeans",
            True,
            _CLUSTERING,
            description="normalised mutual information of k-means clusters and labels",
        ),
        Metric(
            "ami",
            "AMI",
            "mbdl.functional.clustering:adjusted_mutual_info",
            "kmeans",
            True,
            _CLUSTERING,
            summary=False,  # NMI corrected for chance; in metrics.json and the report table
            description="adjusted mutual information of the same clustering",
        ),
        Metric(
            "f1",
            "F1",
            "mbdl.functional.clustering:pair_f1",
            "kmeans",
            True,
            _CLUSTERING,
            description="pair-counting F1 of the same clustering (Song et al. 2016)",
        ),
        Metric(
            "verification",
            "Verification",
            "mbdl.functional.verification:verification_metrics",
            "pairs",
            None,
            _PAIRS,
            summary=False,
            description="TAR, FAR reached and threshold at each FAR; EER and its threshold",
        ),
    )
}


def _check_metric(found: Any, name: str) -> Metric:
    if not isinstance(found, Metric):
        raise PluginError(f"metric {name!r} must be an mbdl.metrics.Metric; got {type(found)!r}")
    if found.name != name:
        raise PluginError(f"metric registered as {name!r} declares the name {found.name!r}")
    return found


METRICS: Registry[Metric] = Registry("metric", "mbdl.metrics", BUILTIN_METRICS, _check_metric)


def registered_metrics() -> tuple[Metric, ...]:
    """Every registered metric: the built-ins in report order, then installed packages' ones."""
    return tuple(METRICS.get(name) for name in METRICS.names())


def metric_of(key: str, metrics: Sequence[Metric] | None = None) -> Metric | None:
    """The metric a single result key belongs to (``recall@4`` -> ``recall@K``), or None."""
    for metric in registered_metrics() if metrics is None else metrics:
        if metric.owns(key):
            return metric
    return None


def selectable_keys(ks: Sequence[int]) -> list[str]:
    """The allowed ``train.select_metric`` values for ``eval.ks``, in report order."""
    return [key for m in registered_metrics() if m.selectable for key in m.keys(ks)]


def summary_keys(ks: Sequence[int]) -> list[str]:
    """The keys compact summaries show (``mbdl compare``'s test table), in report order."""
    return [key for m in registered_metrics() if m.summary for key in m.keys(ks)]


def summary_keys_in(keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that compact summaries show, in report order."""
    metrics = [m for m in registered_metrics() if m.summary]
    return sorted(
        {key for key in keys if metric_of(key, metrics) is not None},
        key=lambda key: metric_sort_key(key, metrics),
    )


def metric_label(key: str, metrics: Sequence[Metric] | None = None) -> str:
    """How reports show a result key (``map@r`` -> ``MAP@R``); unknown keys as themselves."""
    metric = metric_of(key, metrics)
    return key if metric is None else metric.label_of(key)


def metric_sort_key(key: str, metrics: Sequence[Metric] | None = None) -> tuple[int, float, str]:
    """Order result keys as the registry does (a family by K), then anything else by name."""
    metrics = registered_metrics() if metrics is None else metrics
    for position, metric in enumerate(metrics):
        if metric.owns(key):
            k = float(key.rsplit("@", 1)[1]) if metric.is_family else 0.0
            return (position, k, key)
    return (len(metrics), 0.0, key)


def sorted_metric_keys(keys: Iterable[str]) -> list[str]:
    """``keys`` in report order (:func:`metric_sort_key`), reading the registry once."""
    metrics = registered_metrics()
    return sorted(keys, key=lambda key: metric_sort_key(key, metrics))


def higher_is_better(key: str) -> bool:
    """The direction of a selectable key; ``ValueError`` for a key without one."""
    metric = metric_of(key)
    if metric is None or metric.higher_is_better is None:
        raise ValueError(f"metric {key!r} has no direction (not a selectable metric)")
    return metric.higher_is_better


def improves(key: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of metric ``key`` is strictly better than ``best`` (None: anything is)."""
    if best is None:
        return True
    return value > best if higher_is_better(key) else value < best


def select_metric_help() -> str:
    """The built-in ``train.select_metric`` values in words (for the config reference; read at
    import time, so it never loads an installed package's metrics)."""
    names = [
        f"{m.base}@K with K in eval.ks" if m.is_family else m.name
        for m in (METRICS.get(name) for name in METRICS.builtin_names())
        if m.selectable
    ]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
