"""Fault injection: a writer killed at random points of its saves, a disk that fills and a file
system that turns read-only mid-run (real tmpfs mounts where the machine allows them), stale
locks and temporary files of dead writers. Each time the last good checkpoint survives, the
next start cleans up, and ``resume=true`` reproduces the uninterrupted run exactly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures_data import make_folder
from mbdl.cli import main
from mbdl.config import load_config
from mbdl.train import train
from mbdl.train.checkpoint import load_checkpoint
from mbdl.train.runlock import RUN_LOCK
from mbdl.train.trainer import Trainer

SLOW = os.environ.get("MBDL_SLOW", "") not in ("", "0")

RUN = [
    "data.source=folder",
    "data.image_size=16",
    "data.val_fraction=0",
    "model.embedding_dim=8",
    "train.epochs=3",
    "train.batch_classes=2",
    "train.batch_per_class=2",
    "train.max_steps_per_epoch=3",
    "train.checkpoint_every_steps=1",  # a save after every step: kills land in saves
    "train.num_threads=1",
    "train.progress=false",
    "train.device=cpu",
    "eval.ks=[1]",
    "eval.report=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("fault-data") / "data", 6, 4)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run: its metrics and final weights."""
    out = tmp_path_factory.mktemp("fault-reference") / "run"
    metrics = train(load_config(None, [*RUN, f"data.root={data}", f"out={out}"]))
    return {"metrics": metrics, "weights": load_checkpoint(out / "checkpoints" / "best.pt")}


def assert_reproduces(out: Path, reference: dict[str, Any]) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(reference["metrics"]))
    state = load_checkpoint(out / "checkpoints" / "best.pt")["model_state"]
    for key, value in reference["weights"]["model_state"].items():
        assert torch.equal(state[key], value), key
    assert not [p for p in out.rglob("*.tmp")], "temporary files left behind"
    assert not (out / RUN_LOCK).exists()


def cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


# -- killed writers -----------------------------------------------------------------------------


def _kill_during_saves(data: Path, out: Path, kills: int, seed: int) -> int:
    """Start ``mbdl train`` (resume=true) and SIGKILL it at a random moment after it starts
    writing checkpoints, ``kills`` times; returns how many kills left a temporary file."""
    rng = random.Random(seed)
    argv = [
        sys.executable,
        "-m",
        "mbdl",
        "train",
        *RUN,
        f"data.root={data}",
        f"out={out}",
        "resume=true",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    caught = 0
    for _ in range(kills):
        last = out / "checkpoints" / "last.pt"
        before = last.stat().st_mtime_ns if last.exists() else 0
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if last.exists() and last.stat().st_mtime_ns != before:
                break  # it is saving now: kill it somewhere in the next few saves
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL  # it really was killed, not finished
        caught += bool(list((out / "checkpoints").glob(".*.tmp")))
        if last.exists():
            state = load_checkpoint(last)  # never half-written: it loads
            assert state["kind"] == "last"
    return caught


def _kill_and_resume(data: Path, tmp_path: Path, reference: dict[str, Any], kills: int) -> int:
    out = tmp_path / "run"
    caught = _kill_during_saves(data, out, kills, seed=kills)
    code, err = cli("train", *RUN, f"data.root={data}", f"out={out}", "resume=true")
    assert code == 0, err
    assert_reproduces(out, reference)
    return caught


def test_a_killed_writer_resumes_to_the_same_result(
    data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    _kill_and_resume(data, tmp_path, reference, kills=1)


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set MBDL_SLOW=1 for six kills")
def test_many_kills_at_random_points_of_saves(
    data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    caught = _kill_and_resume(data, tmp_path, reference, kills=6)
    print(f"{caught} of 6 kills left a temporary file behind (removed on resume)")


def test_debris_of_a_dead_writer_is_removed_and_its_lock_taken_over(
    data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # stop after the first epoch's checkpoint
        original = Trainer._end_epoch

        def stop_after_first(self: Trainer, validation: Any) -> None:
            original(self, validation)
            raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Trainer, "_end_epoch", stop_after_first)
            train(load_config(None, [*RUN, f"data.root={data}", f"out={out}"]))
    # what a writer SIGKILLed mid-save leaves: its temporary files and its lock
    debris = [out / "checkpoints" / ".last.pt.k2j4x9q1.tmp", out / ".config.yaml.a8d7f6s5.tmp"]
    for path in debris:
        path.write_bytes(b"half a checkpoint")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / RUN_LOCK).write_text(f"{os.uname().nodename} {dead.pid}")
    code, err = cli("train", *RUN, f"data.root={data}", f"out={out}", "resume=true")
    assert code == 0, err
    assert not any(path.exists() for path in debris)
    assert_reproduces(out, reference)


def test_an_empty_lock_is_taken_over(tmp_path: Path) -> None:
    from mbdl.train import runlock

    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_LOCK).write_text("")  # a writer killed between creating and filling it
    runlock.acquire_run_lock(out)
    assert (out / RUN_LOCK).read_text() == runlock.lock_owner()
    runlock.release_run_lock(out)
    assert not (out / RUN_LOCK).exists()


# -- a disk that fills, a file system that turns read-only (real tmpfs mounts) ----------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its file system is full."""
    filler = folder / "filler"
    with open(filler, "wb") as file:
        with contextlib.suppress(OSError):
            while True:
                file.write(bytes(1 << 20))
                file.flush()
        with contextlib.suppress(OSError):
            os.fsync(file.fileno())
    return filler


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
def test_a_failing_file_system_keeps_the_last_checkpoint(
    fault: str, data: Path, tmp_path: Path, reference: dict[str, Any]
) -> None:
    with tmpfs(tmp_path / "mnt", "64m") as mount:
        out = mount / "run"
        argv = ["train", *RUN, f"data.root={data}", f"out={out}"]
        original = Trainer._end_epoch
        undo: list[Any] = []

        def fault_in_second_epoch(self: Trainer, validation: Any) -> None:
            if self.progress.epoch == 1:  # the first epoch's checkpoint is on disk
                if fault == "disk-full":
                    filler = _fill(mount)
                    undo.append(lambda: filler.unlink())
                else:
                    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
                    undo.append(
                        lambda: subprocess.run(
                            ["mount", "-o", "remount,rw", str(mount)], check=True
                        )
                    )
            original(self, validation)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Trainer, "_end_epoch", fault_in_second_epoch)
            code, err = cli(*argv)
        assert code == 2, err
        expected = "No space left on device" if fault == "disk-full" else "Read-only file system"
        assert err.startswith("mbdl: error: ") and expected in err and err.count("\n") == 1
        last = load_checkpoint(out / "checkpoints" / "last.pt")  # the last good one, intact
        assert last["progress"]["epoch"] == 1
        assert not list((out / "checkpoints").glob(".*.tmp"))
        for action in undo:
            action()
        code, err = cli(*argv, "resume=true")
        assert code == 0, err
        assert_reproduces(out, reference)


def test_the_address_space_guard_refuses_an_absurd_allocation() -> None:
    import numpy as np

    from mbdl.index import bounded_address_space

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    size = 4 << 30  # 4 GiB, reserved but never touched: the kernel grants it without the guard
    assert np.empty(size, dtype=np.uint8).nbytes == size
    with pytest.raises(MemoryError), bounded_address_space(64 << 20):
        np.empty(size, dtype=np.uint8)
    assert np.empty(size, dtype=np.uint8).nbytes == size  # the limit is lifted afterwards


def test_an_index_write_killed_midway_leaves_nothing_that_lasts(tmp_path: Path) -> None:
    from mbdl.errors import UserError
    from mbdl.index import GalleryIndex

    embeddings = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
    index = GalleryIndex.build(embeddings, torch.arange(20) % 4, model_id="m")
    target = tmp_path / "gallery.index"
    host = os.uname().nodename
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".gallery.index.{host}-{dead.pid}.x1y2z3"  # a killed writer's staging
    live = tmp_path / f".gallery.index.{host}-{os.getppid()}.a1b2c3"  # a live writer's: kept
    for folder in (stale, live):
        folder.mkdir()
        (folder / "index.faiss").write_bytes(b"partial")
    index.save(target)
    assert not stale.exists() and live.exists()
    assert len(GalleryIndex.load(target)) == 20
    # killed between moving the old index aside and moving the new one in
    os.replace(target, tmp_path / ".gallery.index.old")
    with pytest.raises(UserError, match=r"\.gallery\.index\.old does: a write was interrupted"):
        GalleryIndex.load(target)
