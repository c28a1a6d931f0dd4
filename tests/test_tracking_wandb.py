"""The W&B sink with the real ``wandb`` package in offline mode, read back from its run file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mbdl.cli import main

wandb = pytest.importorskip("wandb")

BLOCK = 32768  # the LevelDB-log layout of a .wandb file: 7-byte header, then records in blocks


def read_records(path: Path) -> list[object]:
    """The protobuf records of a ``.wandb`` run file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def name(item: object) -> str:
    """An item's key (``validation/map@r`` may be stored as the nested key ``[validation,
    map@r]``)."""
    return str(getattr(item, "key", "")) or "/".join(getattr(item, "nested_key", []))


def test_wandb_offline_run_holds_config_epochs_and_test_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "mbdl-test")
    out = tmp_path / "run"
    args = [
        "data.max_classes=24",
        "model.embedding_dim=8",
        "train.epochs=2",
        "train.batch_classes=4",
        "train.batch_per_class=2",
        "train.max_steps_per_epoch=1",
        "train.device=cpu",
        "train.progress=false",
        "train.loggers=[wandb]",
        "eval.ks=[1]",
        "eval.report=false",
        f"out={out}",
    ]
    assert main(["train", *args]) == 0
    wandb.teardown()  # the wandb service writes the run file; stopping it flushes everything
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    run_id = (out / "wandb_run_id").read_text().strip()
    assert run_id in run_file.name
    history, summary, config = [], {}, {}
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({name(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({name(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({name(i): json.loads(i.value_json) for i in record.config.update})
    assert [row["_step"] for row in history if "train_loss" in row] == [1, 2]
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert history[0]["train_loss"] == pytest.approx(logged["train_loss"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["test/map@r"] == pytest.approx(metrics["test"]["map@r"])
    assert config["model.embedding_dim"] == 8 or config.get("model", {}).get("embedding_dim") == 8
