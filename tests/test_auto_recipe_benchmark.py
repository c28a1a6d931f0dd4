"""benchmarks/auto_recipe.py's bookkeeping: the best cell on mean validation MAP@R, the ratios of
the means over the seeds both runs have, and the table's cells for seeds not run or failed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def auto_recipe() -> Any:
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location(
            "auto_recipe_under_test", ROOT / "benchmarks" / "auto_recipe.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT))


def _run(val: float, test: float, wall: float) -> dict[str, Any]:
    return {
        "val_map@r": val,
        "test_map@r": test,
        "wall_s": wall,
        "train_s": wall / 2,
        "resolved": {
            "model.backbone": "mobilenet_v2",
            "data.image_size": 64,
            "train.batch": 64,
            "train.steps": 10,
        },
    }


def _entry(auto_recipe: Any, seeds: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    runs = {cell: {"description": cell, "seeds": {}} for cell in ["auto", *auto_recipe.GRID]}
    for cell, by_seed in seeds.items():
        runs[cell]["seeds"].update(by_seed)
    return {"keys": [], "train_classes": 4, "train_images": 100, "runs": runs}


def test_the_best_is_chosen_on_mean_validation_and_the_ratios_are_of_means(
    auto_recipe: Any,
) -> None:
    cells = list(auto_recipe.GRID)
    entry = _entry(
        auto_recipe,
        {
            "auto": {"0": _run(0.5, 0.18, 100), "1": _run(0.5, 0.20, 80)},
            # best on test, worst on validation: never chosen
            cells[0]: {"0": _run(0.1, 0.90, 10), "1": _run(0.1, 0.90, 10)},
            # the best mean validation (0.45), though seed 1 alone is beaten by cells[2]
            cells[1]: {"0": _run(0.60, 0.20, 200), "1": _run(0.30, 0.20, 120)},
            cells[2]: {"0": _run(0.40, 0.10, 50), "1": _run(0.40, 0.10, 50)},
        },
    )
    auto_recipe.summarize(entry)
    assert entry["best_on_validation"] == cells[1]
    assert entry["map_ratio"] == pytest.approx(0.19 / 0.20)
    assert entry["time_ratio"] == pytest.approx(90 / 160)
    assert entry["per_seed"]["0"]["map_ratio"] == pytest.approx(0.18 / 0.20)
    assert entry["per_seed"]["1"]["time_ratio"] == pytest.approx(80 / 120)
    assert entry["meets_target"] is True


def test_a_failed_or_missing_seed_is_left_out_and_the_table_says_which(auto_recipe: Any) -> None:
    cells = list(auto_recipe.GRID)
    entry = _entry(
        auto_recipe,
        {
            "auto": {"0": _run(0.5, 0.10, 100), "1": _run(0.5, 0.30, 100)},
            cells[0]: {"0": _run(0.6, 0.20, 50), "1": {"error": ["killed"]}},
            cells[1]: {"0": _run(0.2, 0.20, 50)},  # seed 1 not run
        },
    )
    auto_recipe.summarize(entry)
    assert entry["best_on_validation"] == cells[0]
    # only seed 0 is shared by the auto default and the best: 0.10 / 0.20, not 0.20 / 0.20
    assert entry["map_ratio"] == pytest.approx(0.5)
    assert entry["meets_target"] is False
    results = {
        "machine": {"date": "2026-12-07", "cpus": 2, "torch": "2"},
        "threads": 2,
        "scale": 1.0,
        "seeds": [0, 1],
        "grid_passes": list(auto_recipe.GRID_PASSES),
        "datasets": {"icons": entry},
    }
    table = auto_recipe.markdown(results)
    assert f"| icons | {cells[0]} | 0.600 / failed |" in table
    assert f"| icons | {cells[1]} | 0.200 / not run |" in table
    assert "| **missed** |" in table


@pytest.mark.parametrize(("steps", "pass_steps"), [(430, 14), (100, 50), (3, 10), (2139, 70)])
def test_a_scaled_budget_never_makes_an_epoch_longer_than_one_pass(
    auto_recipe: Any, steps: int, pass_steps: int
) -> None:
    epochs, per_epoch = auto_recipe.scaled_epochs(steps, 1.0, pass_steps)
    assert per_epoch <= pass_steps
    assert max(5, steps) <= epochs * per_epoch < max(5, steps) + epochs
