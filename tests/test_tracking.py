"""Tracker sinks: TensorBoard event files and the MLflow file store, read back with their own readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbdl.cli import main
from mbdl.config import CONFIG_SCHEMA, config_to_flat, load_config
from mbdl.tracking import SINKS, TensorBoardSink, epoch_scalars

SMALL = [
    "data.max_classes=40",
    "model.embedding_dim=16",
    "train.epochs=2",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
    "train.num_threads=1",
    "eval.ks=[1, 2]",
]


def test_the_config_offers_every_registered_sink() -> None:
    assert set(CONFIG_SCHEMA["train.loggers"][2] or ()) == set(SINKS)


def test_epoch_scalars_take_the_numbers_of_a_log_record() -> None:
    record = {
        "epoch": 3,
        "step": 30,
        "train_loss": 0.5,
        "lr": 1e-3,
        "images_per_s": None,
        "elapsed_s": 2.0,
        "world_size": 1,
        "validation": {"recall@1": 0.25, "map@r": 0.125},
    }
    assert epoch_scalars(record) == {
        "train_loss": 0.5,
        "lr": 1e-3,
        "elapsed_s": 2.0,
        "validation/recall@1": 0.25,
        "validation/map@r": 0.125,
    }


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    out = tmp_path_factory.mktemp("tracking") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["train", f"out={out}", "train.loggers=[tensorboard, mlflow]", *SMALL]) == 0
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_log(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    log = _log(tracked_run)
    assert len(log) == 2
    for name in ("train_loss", "lr", "images_per_s", "validation/recall@1", "validation/map@r"):
        values = {e.step: e.value for e in events.Scalars(name)}
        assert values == pytest.approx({r["epoch"]: epoch_scalars(r)[name] for r in log}), name
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    for name, value in metrics["test"].items():
        (event,) = events.Scalars(f"test/{name}")
        assert event.value == pytest.approx(value) and event.step == 2
    figures = [t for t in tags["images"] if t.startswith("report/")]
    assert any("recall" in t for t in figures) and any("projection" in t for t in figures)
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| loss.name | mdl |" in config_text


def test_mlflow_file_store_holds_the_log(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tracked_run / "mlruns").resolve().as_uri())
    run_id = (tracked_run / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    config = load_config(tracked_run / "config.yaml")
    assert run.data.params == {k: str(v) for k, v in config_to_flat(config).items()}
    log = _log(tracked_run)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "validation/recall_at_1")}
    assert history == pytest.approx({r["epoch"]: r["validation"]["recall@1"] for r in log})
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
    assert losses == pytest.approx({r["epoch"]: r["train_loss"] for r in log})
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert run.data.metrics["test/map_at_r"] == pytest.approx(metrics["test"]["map@r"])
    artifacts = [a.path for a in client.list_artifacts(run_id, "report")]
    assert any(p.endswith(".png") and "recall" in p for p in artifacts)


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(
        SINKS, "tensorboard", (TensorBoardSink, "no_such_module_xyz", "tensorboard")
    )
    out = tmp_path / "run"
    assert main(["train", f"out={out}", "train.loggers=tensorboard", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "pip install 'mbdl[tensorboard]'" in err[0] and "no_such_module_xyz" in err[0]
    assert not out.exists()


def test_a_failing_sink_warns_and_training_goes_on(tmp_path: Path) -> None:
    from mbdl.tracking import Sinks

    class Broken:
        def log_epoch(self, record: dict) -> None:
            raise ConnectionError("tracker down")

        def close(self) -> None:
            raise AssertionError("a dropped sink is not called again")

    sinks = Sinks([Broken()])  # type: ignore[list-item]
    with pytest.warns(UserWarning, match="tracker down"):
        sinks.log_epoch({"epoch": 1})
    assert not sinks
    sinks.close()
