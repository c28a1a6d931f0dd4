"""``mbdl compare``: a tiny real comparison on glyphs (2 losses, 2 seeds, search budget 2, one
short epoch), its resumption, its summary checked against the run files, and its errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

import mbdl.train
from mbdl.cli import main
from mbdl.compare import SEARCH_GRIDS, compare, epochs_to_reach, mean_curve, mean_std

TINY = [
    "data.max_classes=24",
    "train.epochs=1",
    "train.warmup_epochs=0",
    "train.max_steps_per_epoch=3",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.progress=false",
    "eval.report=false",
]
LOSSES = ["mdl", "triplet"]


class CountingTrain:
    """Wraps :func:`mbdl.train.train`, recording the run directories it was called for."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.real = mbdl.train.train

    def __call__(self, config: Any) -> dict[str, Any]:
        self.calls.append(str(config.out))
        return self.real(config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str]]:
    out = tmp_path_factory.mktemp("compare")
    counter = CountingTrain()
    summary = compare(
        None,
        TINY,
        losses=LOSSES,
        seeds=2,
        search_budget=2,
        out=out,
        train_fn=counter,
        log=lambda _: None,
    )
    return out, summary, counter.calls


def _run_dirs(out: Path, loss: str) -> list[Path]:
    return sorted(p.parent for p in (out / loss).glob("*/metrics.json"))


def _loss_config(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((run / "config.yaml").read_text())
    return data


def test_runs_each_search_value_and_seed_once(tiny: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, _, calls = tiny
    # 2 search values with seed 0 (one of them is also seed 0's final run) + seed 1: 3 per loss
    assert len(calls) == len(set(calls)) == 6
    for loss in LOSSES:
        assert len(_run_dirs(out, loss)) == 3


def test_same_setup_for_every_loss(tiny: tuple[Path, dict[str, Any], list[str]]) -> None:
    out, _, _ = tiny
    shared = []
    for loss in LOSSES:
        for run in _run_dirs(out, loss):
            config = _loss_config(run)
            assert config["loss"]["name"] == loss
            shared.append((config["data"], config["model"], config["train"], config["eval"]))
    assert all(s == shared[0] for s in shared)


def test_chosen_value_has_best_validation_metric(
    tiny: tuple[Path, dict[str, Any], list[str]],
) -> None:
    out, summary, _ = tiny
    for loss in LOSSES:
        param = SEARCH_GRIDS[loss][0]
        scores = {}
        for run in _run_dirs(out, loss):
            config = _loss_config(run)
            if config["seed"] != 0:
                continue
            metrics = json.loads((run / "metrics.json").read_text())
            scores[config["loss"][param]] = metrics["validation"]["map@r"]
        assert len(scores) == 2
        best = max(scores.values())
        chosen = summary["losses"][loss]["chosen"][param]
        assert scores[chosen] == best
        # every seed's final run used the chosen value
        finals = [_loss_config(out / r["run"]) for r in summary["losses"][loss]["runs"]]
        assert sorted(c["seed"] for c in finals) == [0, 1]
        assert all(c["loss"][param] == chosen for c in finals)


def test_summary_is_mean_and_std_of_run_metrics(
    tiny: tuple[Path, dict[str, Any], list[str]],
) -> None:
    out, _, _ = tiny
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["complete"] is True
    for loss in LOSSES:
        runs = [out / r["run"] for r in on_disk["losses"][loss]["runs"]]
        tests = [json.loads((run / "metrics.json").read_text())["test"] for run in runs]
        for metric in ("recall@1", "recall@8", "map@r", "r_precision", "nmi", "f1"):
            values = [t[metric] for t in tests]
            entry = on_disk["losses"][loss]["test"][metric]
            assert entry["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert entry["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    markdown = (out / "summary.md").read_text()
    assert "| mdl |" in markdown and "| triplet |" in markdown
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and 'src="http' not in page


def test_resume_trains_nothing(
    tiny: tuple[Path, dict[str, Any], list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, summary, _ = tiny
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")}
    counter = CountingTrain()
    monkeypatch.setattr(mbdl.train, "train", counter)
    argv = ["compare", "--losses", ",".join(LOSSES), "--seeds", "2", "--search-budget", "2"]
    assert main([*argv, "--out", str(out), *TINY]) == 0
    assert counter.calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")} == before
    again = json.loads((out / "summary.json").read_text())
    assert again["losses"] == json.loads(json.dumps(summary["losses"]))
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--losses", "mdl,nosuchloss"], "unknown loss 'nosuchloss'"),
        (["--losses", "mdl", "--seeds", "0"], "--seeds must be at least 1"),
        (["--losses", "mdl", "--search-budget", "9"], "--search-budget must be between"),
        (["--losses", "mdl,mdl"], "lists a loss twice"),
        (["--losses", "mdl", "loss.margin=0.3"], "sets loss.margin itself"),
        (["--losses", "mdl", "train.epochs=0"], "train.epochs must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", *args, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("mbdl: error:")


def test_epochs_to_reach_and_means() -> None:
    curve = [(1, 10.0, 0.5), (2, 20.0, 0.9), (3, 30.0, 0.96), (4, 40.0, 1.0), (5, 50.0, 0.97)]
    assert epochs_to_reach(curve) == (3, 30.0)  # 0.96 >= 0.95 * 1.0, 0.9 is not
    assert epochs_to_reach(curve, fraction=0.5) == (1, 10.0)
    assert epochs_to_reach([]) is None
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, None)
    averaged = mean_curve([[(1, 1.0, 0.2), (2, 2.0, 0.4)], [(1, 3.0, 0.4), (2, 4.0, 0.8)]])
    assert averaged["epoch"] == [1.0, 2.0]
    assert averaged["elapsed_s"] == pytest.approx([2.0, 3.0])
    assert averaged["value"] == pytest.approx([0.3, 0.6])
