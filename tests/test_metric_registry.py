"""The metric registry: one declaration from which evaluate, config validation, the report and
``mbdl compare`` take their lists, labels and directions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import mbdl.metrics as registry
from mbdl.compare import summarize_loss, summary_markdown, summary_tables
from mbdl.config import ConfigError, config_to_flat, load_config
from mbdl.evaluate import evaluate
from mbdl.metrics import (
    METRICS,
    Metric,
    improves,
    metric_label,
    registered_metrics,
    selectable_keys,
    sorted_metric_keys,
    summary_keys,
)
from mbdl.plugins import PluginError
from mbdl.report.html import render_report


def _second_hit(matches: torch.Tensor) -> torch.Tensor:
    """A throw-away kNN metric: whether the second nearest neighbour has the query's class."""
    return matches[:, 1].double()


SECOND_HIT = Metric(
    "second_hit",
    "2nd-NN hit",
    _second_hit,
    "knn",
    True,
    ("eval.distance",),
    depth=2,
    description="the second nearest neighbour has the query's class",
)


@pytest.fixture
def with_second_hit(monkeypatch: pytest.MonkeyPatch) -> Metric:
    monkeypatch.setitem(registry.BUILTIN_METRICS, SECOND_HIT.name, lambda: SECOND_HIT)
    return SECOND_HIT


def _data(
    n_classes: int = 6, per_class: int = 7, dim: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.randn(n_classes, dim, generator=g)[labels] + 0.8 * torch.randn(
        len(labels), dim, generator=g
    )
    return x, labels


def test_every_declaration_is_complete() -> None:
    flat = config_to_flat(load_config(None, []))
    names = [m.name for m in registered_metrics()]
    assert len(names) == len(set(names))
    for metric in registered_metrics():
        assert callable(metric.resolve()), metric.name
        assert metric.label and metric.description, metric.name
        assert all(key in flat for key in metric.eval_keys), (metric.name, metric.eval_keys)
        assert METRICS.get(metric.name) is metric


def test_every_selectable_metric_is_in_evaluate_output_with_its_label() -> None:
    x, labels = _data()
    result = evaluate(x, labels, ks=(1, 3))
    for key in selectable_keys((1, 3)):
        assert key in result
        assert metric_label(key) != key or registry.metric_of(key) is None
    assert metric_label("recall@3") == "Recall@3" and metric_label("map@r") == "MAP@R"
    assert metric_label("eer") == "eer"  # not a declared key: shown as itself


def test_derived_lists_keep_todays_names() -> None:
    assert selectable_keys((1, 2, 4, 8)) == [
        "recall@1", "recall@2", "recall@4", "recall@8",
        "precision@1", "r_precision", "map@r", "nmi", "ami", "f1",
    ]  # fmt: skip
    assert summary_keys((1, 2, 4, 8)) == [
        "recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r", "nmi", "f1",
    ]  # fmt: skip
    keys = ["eer", "f1", "recall@10", "map@r", "ami", "recall@2", "kmeans/seed", "nmi"]
    assert sorted_metric_keys(keys) == [
        "recall@2", "recall@10", "map@r", "nmi", "ami", "f1", "eer", "kmeans/seed",
    ]  # fmt: skip


def test_a_new_metric_is_one_declaration(with_second_hit: Metric, tmp_path: Path) -> None:
    """Register a throw-away metric: evaluate computes it, train.select_metric accepts it, the
    report shows it with its label and mbdl compare's summary has a column for it."""
    x, labels = _data()
    result = evaluate(x, labels, ks=(1, 2))
    # brute force: the second nearest other item of each query (leave-one-out)
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    second = d.argsort(dim=1)[:, 1]
    assert result["second_hit"] == pytest.approx(float((labels[second] == labels).double().mean()))
    assert list(evaluate(x, labels, metrics=["second_hit"])) == ["second_hit"]

    assert load_config(None, ["train.select_metric=second_hit"]).train.select_metric == "second_hit"
    with pytest.raises(ConfigError, match="second_hit"):
        load_config(None, ["train.select_metric=third_hit"])

    metrics = {"validation": dict(result), "test": dict(result)}
    page = render_report(
        config={"train.select_metric": "second_hit"},
        history=[],
        metrics=metrics,
        training_plot=None,
        recall_plot=None,
        projection_plot=None,
        retrievals=[],
        dataset=None,
        distance="euclidean",
    )
    assert (
        '<th scope="row" title="the second nearest neighbour has the query&#x27;s class">2nd-NN hit'
        in page
    )

    runs = [
        {"seed": seed, "run": f"mdl/run{seed}", "metrics": {"test": {**result, "second_hit": v}}}
        for seed, v in ((0, 0.25), (1, 0.75))
    ]
    state: dict[str, Any] = {
        "settings": {
            "config": None, "overrides": [], "losses": ["mdl"], "seeds": [0, 1],
            "search_budget": 1, "search_epochs": 1, "epochs": 1, "select_metric": "second_hit",
        },
        "losses": {"mdl": summarize_loss(tmp_path, "margin", [], 0.2, runs)},
    }  # fmt: skip
    header = summary_tables(state)["test"][0]
    assert "second_hit" in header and header.index("map@r") < header.index("second_hit")
    assert state["losses"]["mdl"]["test"]["second_hit"]["mean"] == pytest.approx(0.5)
    assert "0.500 ± 0.354" in summary_markdown(state)


def test_direction_comes_from_the_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    lower = Metric("spread", "Spread", _second_hit, "knn", False, depth=1)
    monkeypatch.setitem(registry.BUILTIN_METRICS, "spread", lambda: lower)
    assert improves("map@r", 0.6, 0.5) and not improves("map@r", 0.5, 0.5)
    assert improves("spread", 0.4, 0.5) and not improves("spread", 0.6, 0.5)
    assert improves("spread", 9.0, None)
    assert "spread" in selectable_keys((1,))
    assert "verification" not in selectable_keys((1,))
    with pytest.raises(ValueError, match="no direction"):
        improves("eer", 0.1, 0.2)


def test_bad_declarations_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="depth"):
        Metric("hits@K", "Hits@K", _second_hit, "knn", True, depth=1)
    with pytest.raises(ValueError, match="needs"):
        Metric("odd", "Odd", _second_hit, "labels", True)  # type: ignore[arg-type]
    monkeypatch.setitem(registry.BUILTIN_METRICS, "alias", lambda: SECOND_HIT)
    with pytest.raises(PluginError, match="declares the name"):
        registered_metrics()


def test_unknown_metric_lists_the_registry() -> None:
    x, labels = _data()
    with pytest.raises(ValueError, match=r"allowed: recall \(every K in ks\), recall@<K>, .*f1"):
        evaluate(x, labels, metrics=["recal@1"])
    assert set(evaluate(x, labels, ks=(1, 2), metrics=["Recall", "recall@3"])) == {
        "recall@1",
        "recall@2",
        "recall@3",
    }


def test_squared_euclidean_ranks_as_euclidean_with_squared_thresholds() -> None:
    x, labels = _data(n_classes=8, per_class=9)
    euclidean = evaluate(x, labels, ks=(1, 2, 4), distance="euclidean", verify_fars=(0.1, 0.01))
    squared = evaluate(
        x, labels, ks=(1, 2, 4), distance="squared_euclidean", verify_fars=(0.1, 0.01)
    )
    assert squared.keys() == euclidean.keys()
    thresholds = {k for k in euclidean if k.startswith("threshold@") or k == "eer_threshold"}
    assert thresholds
    for key, value in euclidean.items():
        if key in thresholds:  # a distance: in squared units
            assert squared[key] == pytest.approx(value**2, rel=1e-5, abs=1e-9), key
        else:  # rank, clustering and rate metrics: identical
            assert squared[key] == pytest.approx(value, abs=1e-12), key


def test_every_builtin_metric_is_documented() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    for name in METRICS.builtin_names():
        assert f"`{name}`" in page, name


def test_a_squared_threshold_applies_to_a_euclidean_index() -> None:
    """mbdl index stores euclidean distances; a squared_euclidean run's stored threshold t is
    the euclidean threshold sqrt(t) there (the same accept/reject decisions)."""
    from mbdl.cli import _match_threshold
    from mbdl.errors import UserError
    from mbdl.model.record import VerificationRecord

    state = VerificationRecord(threshold=0.49, distance="squared_euclidean", far=None)
    assert _match_threshold("checkpoint", state, "squared_euclidean") == 0.49
    assert _match_threshold("checkpoint", state, "euclidean") == pytest.approx(0.7)
    with pytest.raises(UserError, match="stored threshold is a squared_euclidean distance"):
        _match_threshold("checkpoint", state, "cosine")


def test_an_installed_package_adds_a_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package declaring a Metric in the entry-point group ``mbdl.metrics`` is evaluated and
    selectable like a built-in."""
    (tmp_path / "fake_metric_pkg.py").write_text(
        "from mbdl.metrics import Metric\n"
        "def top_miss(matches):\n"
        "    return 1.0 - matches[:, 0].double()\n"
        "TOP_MISS = Metric('top_miss', 'Top miss', top_miss, 'knn', False, depth=1)\n"
    )
    info = tmp_path / "fake_metric_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-metric-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mbdl.metrics]\ntop_miss = fake_metric_pkg:TOP_MISS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_metric_pkg", raising=False)
    x, labels = _data()
    result = evaluate(x, labels, ks=(1,), metrics=["recall@1", "top_miss"])
    assert result["top_miss"] == pytest.approx(1.0 - result["recall@1"])
    assert "top_miss" in selectable_keys((1,))
    assert improves("top_miss", 0.1, 0.2)  # lower is better, as it declares
    assert load_config(None, ["train.select_metric=top_miss"]).train.select_metric == "top_miss"
