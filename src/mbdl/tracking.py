"""Experiment-tracker sinks: what ``log.jsonl`` and ``metrics.json`` get, sent to TensorBoard,
MLflow or Weights & Biases too (``train.loggers=[tensorboard, mlflow, wandb]``).

A sink receives the resolved config as hyper-parameters once, each epoch's ``log.jsonl`` record
(``train_loss``, ``lr``, ``images_per_s``, ``validation/<metric>`` at step = epoch), the final
test metrics (``test/<metric>``) and the report's figures (PNG images) when ``report.html`` is
written. Only rank 0 logs.

- ``tensorboard``: event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``);
- ``mlflow``: a run in experiment ``mbdl`` of ``$MLFLOW_TRACKING_URI``, else of the file store
  ``OUT/mlruns`` (``mlflow ui --backend-store-uri OUT/mlruns``); a resumed training run continues
  its MLflow run (its id is kept in ``OUT/mlflow_run_id``);
- ``wandb``: a run of project ``$WANDB_PROJECT`` (default ``mbdl``), files in ``OUT/wandb``
  (``WANDB_MODE=offline``: on disk only, ``wandb sync`` later); resumed like MLflow's
  (``OUT/wandb_run_id``).

Add a sink: a class with the methods of :class:`Sink`, registered in :data:`SINKS` with the
package it needs and the extra that installs it.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from mbdl.config import ConfigError


class Sink(Protocol):
    """Where a run's numbers go besides ``log.jsonl``."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_epoch(self, record: Mapping[str, Any]) -> None: ...

    def log_test(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def log_figures(self, figures: Mapping[str, bytes], step: int) -> None: ...

    def close(self) -> None: ...


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a ``log.jsonl`` record as ``name -> value`` (validation as ``validation/k``)."""
    scalars: dict[str, float] = {}
    for key in ("train_loss", "lr", "images_per_s", "elapsed_s"):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = float(value)
    for key, value in (record.get("validation") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[f"validation/{key}"] = float(value)
    return scalars


def _metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits and ``_-./ `` only (``recall@1`` -> ``recall_at_1``)."""
    return re.sub(r"[^\w\-./ ]", "_", name.replace("@", "_at_"))


class TensorBoardSink:
    """Scalars, hyper-parameters (as a text table and the HParams plugin) and figures."""

    def __init__(self, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = out / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.params: dict[str, Any] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()
        }
        table = "\n".join(
            ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.params.items()]
        )
        self.writer.add_text("config", table, 0)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        step = int(record["epoch"])
        for name, value in epoch_scalars(record).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_test(self, metrics: Mapping[str, Any], step: int) -> None:
        test = {f"test/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        for name, value in test.items():
            self.writer.add_scalar(name, value, step)
        if self.params:
            self.writer.add_hparams(
                {k: v for k, v in self.params.items() if v is not None},
                {f"hparam/{k}": v for k, v in test.items()},
                run_name=".",
            )
        self.writer.flush()

    def log_figures(self, figures: Mapping[str, bytes], step: int) -> None:
        import numpy as np
        from PIL import Image

        for name, png in figures.items():
            with Image.open(io.BytesIO(png)) as image:
                array = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"report/{name}", array, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """Params, metrics per epoch and the report's figures in an MLflow run."""

    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, out: Path) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # mbdl's own default: a file store inside the run directory
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.tracking_uri = uri
        id_file = out / self.RUN_ID_FILE
        if id_file.is_file():  # a resumed training run continues its MLflow run
            self.run_id = id_file.read_text(encoding="utf-8").strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("mbdl")
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment("mbdl")
            )
            run = self.client.create_run(experiment_id, run_name=out.name)
            self.run_id = run.info.run_id
            from mbdl.fileio import atomic_write_text

            atomic_write_text(id_file, self.run_id + "\n")
        self.client.set_tag(self.run_id, "mbdl.run_dir", str(out.resolve()))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_metric_name(k), float(v), now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        self._log_metrics(epoch_scalars(record), int(record["epoch"]))

    def log_test(self, metrics: Mapping[str, Any], step: int) -> None:
        test = {f"test/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._log_metrics(test, step)

    def log_figures(self, figures: Mapping[str, bytes], step: int) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            for name, png in figures.items():
                path = Path(folder) / f"{name}.png"
                path.write_bytes(png)
                self.client.log_artifact(self.run_id, str(path), "report")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """A Weights & Biases run in project ``$WANDB_PROJECT`` (default ``mbdl``), its files in
    ``OUT/wandb``; ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` uploads it later). A
    resumed training run continues its W&B run (its id is kept in ``OUT/wandb_run_id``)."""

    def __init__(self, out: Path) -> None:
        import wandb

        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mbdl"),
            dir=str(out),
            id=run_id,
            resume="allow",
            name=out.name,
        )
        if not id_file.is_file():
            from mbdl.fileio import atomic_write_text

            atomic_write_text(id_file, run_id + "\n")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(
            {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()},
            allow_val_change=True,
        )

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        self.run.log(epoch_scalars(record), step=int(record["epoch"]))

    def log_test(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.run.summary[f"test/{key}"] = float(value)

    def log_figures(self, figures: Mapping[str, bytes], step: int) -> None:
        import wandb
        from PIL import Image

        images = {
            f"report/{name}": wandb.Image(Image.open(io.BytesIO(png)))
            for name, png in figures.items()
        }
        if images:
            self.run.log(images)

    def close(self) -> None:
        self.run.finish()


#: name -> (factory, the module it needs, the extra that installs it)
SINKS: dict[str, tuple[Callable[[Path], Sink], str, str]] = {
    "tensorboard": (TensorBoardSink, "tensorboard", "tensorboard"),
    "mlflow": (MLflowSink, "mlflow", "mlflow"),
    "wandb": (WandbSink, "wandb", "wandb"),
}


def check_sinks(names: list[str]) -> None:
    """Refuse unknown sink names and sinks whose package is missing (one line with the fix)."""
    for name in names:
        if name not in SINKS:
            raise ConfigError(
                f"train.loggers: unknown logger {name!r}; choose from {', '.join(SINKS)}"
            )
        _, module, extra = SINKS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.loggers={name} needs the {module} package; run: pip install 'mbdl[{extra}]'"
            )


class Sinks:
    """Every configured sink, called together (rank 0 only; elsewhere an empty list)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    @classmethod
    def open(cls, names: list[str], out: Path, enabled: bool = True) -> Sinks:
        check_sinks(names)
        if not enabled:
            return cls([])
        return cls([SINKS[name][0](out) for name in dict.fromkeys(names)])

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def _each(self, call: Callable[[Sink], None]) -> None:
        """``call`` on every sink; a sink that fails is warned about and dropped (a tracker
        outage never stops training: ``log.jsonl`` and ``metrics.json`` still have everything)."""
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as error:
                warnings.warn(
                    f"{type(sink).__name__} failed and is dropped for this run: {error}",
                    stacklevel=3,
                )
                self.sinks.remove(sink)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each(lambda sink: sink.log_params(params))

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        self._each(lambda sink: sink.log_epoch(record))

    def log_test(self, metrics: Mapping[str, Any], step: int) -> None:
        self._each(lambda sink: sink.log_test(metrics, step))

    def log_report(self, report: Path, step: int) -> None:
        """The figures of ``report.html`` (its plots, not the thumbnails)."""
        if not self.sinks or not report.is_file():
            return
        figures = report_figures(report.read_text(encoding="utf-8"))
        self._each(lambda sink: sink.log_figures(figures, step))

    def close(self) -> None:
        self._each(lambda sink: sink.close())
        self.sinks = []


_FIGURE = re.compile(
    r'<figure class="plot[^"]*"><img src="data:image/png;base64,(?P<data>[^"]+)" alt="(?P<alt>[^"]*)"'
)


def report_figures(page: str) -> dict[str, bytes]:
    """``name -> PNG bytes`` of the plots embedded in a ``report.html`` page."""
    figures: dict[str, bytes] = {}
    for match in _FIGURE.finditer(page):
        alt = html.unescape(match.group("alt"))
        name = re.sub(r"[^a-z0-9]+", "_", alt.lower()).strip("_")[:60] or f"figure_{len(figures)}"
        figures[name] = base64.b64decode(match.group("data"))
    return figures


__all__ = ["SINKS", "Sink", "Sinks", "check_sinks", "epoch_scalars", "report_figures"]
