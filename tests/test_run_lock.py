"""One process at a time per run directory: a live holder is refused, a dead one taken over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mbdl.config import ConfigError, load_config
from mbdl.train import train
from mbdl.train.runlock import RUN_LOCK, acquire_run_lock, release_run_lock

TINY = [
    "data.max_classes=24",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.batch_classes=4",
    "train.batch_per_class=2",
    "train.max_steps_per_epoch=1",
    "train.progress=false",
    "train.device=cpu",
    "eval.ks=[1]",
    "eval.report=false",
]


def write_lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_LOCK).write_text(f"{host or socket.gethostname()} {pid}")


def test_a_live_holder_is_refused_and_its_lock_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from mbdl.train.runlock import acquire_run_lock; "
            "acquire_run_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        config = load_config(None, [*TINY, f"data.root={tmp_path}", f"out={run}", "resume=true"])
        with pytest.raises(ConfigError, match=f"another process \\(pid {holder.pid}\\)"):
            train(config)
        assert (run / RUN_LOCK).read_text().endswith(str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
    acquire_run_lock(run)  # the kernel released the killed holder's lock: taken over
    assert (run / RUN_LOCK).read_text().endswith(str(os.getpid()))
    release_run_lock(run)


def test_a_lock_naming_a_live_process_that_holds_nothing_is_taken_over(tmp_path: Path) -> None:
    write_lock(tmp_path, os.getppid())  # e.g. its pid was reused: the flock is what counts
    acquire_run_lock(tmp_path)
    assert (tmp_path / RUN_LOCK).read_text().endswith(str(os.getpid()))
    release_run_lock(tmp_path)


def test_a_dead_holder_is_taken_over_and_the_lock_released(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "run", dead.pid)
    config = load_config(
        None, [*TINY, f"data.root={tmp_path}", f"out={tmp_path / 'run'}", "resume=true"]
    )
    metrics = train(config)
    assert "recall@1" in metrics["test"]
    assert not (tmp_path / "run" / RUN_LOCK).exists()


def test_lock_of_another_machine_names_it(tmp_path: Path) -> None:
    write_lock(tmp_path, 12345, host="elsewhere")
    with pytest.raises(ConfigError, match="locked by a run on elsewhere"):
        acquire_run_lock(tmp_path)


def test_release_only_removes_our_own_lock(tmp_path: Path) -> None:
    write_lock(tmp_path, os.getppid())
    release_run_lock(tmp_path)
    assert (tmp_path / RUN_LOCK).exists()
    acquire_run_lock(tmp_path)
    acquire_run_lock(tmp_path)  # re-entrant within one process (an interrupted run, resumed)
    release_run_lock(tmp_path)
    assert not (tmp_path / RUN_LOCK).exists()
