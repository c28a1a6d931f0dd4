"""Many processes racing to take over a stale run lock: at most one holds it at any moment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbdl.train.runlock import RUN_LOCK

#: one contender: wait for the start signal, try to take the lock, and while holding it create
#: an ``inside`` marker exclusively (a second holder at the same time finds it and says so)
CONTENDER = r"""
import os, sys, time
from pathlib import Path
from mbdl.config import ConfigError
from mbdl.train import runlock
from mbdl.train.runlock import acquire_run_lock, release_run_lock
read_holder = runlock._read_holder
def slow_read_holder(lock):  # widen any window between reading the lock and acting on it
    holder = read_holder(lock)
    time.sleep(0.01)
    return holder
runlock._read_holder = slow_read_holder
out, go = Path(sys.argv[1]), Path(sys.argv[2])
(go.parent / f"ready{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.0005)
try:
    acquire_run_lock(out)
except ConfigError:
    sys.exit(3)
try:
    handle = os.open(out / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
except FileExistsError:
    sys.exit(4)  # another process holds the lock at the same time
os.close(handle)
time.sleep(0.1)
os.unlink(out / "inside")
if sys.argv[3] == "release":
    release_run_lock(out)
sys.exit(0)
"""


def _race(tmp_path: Path, round_: int, contenders: int, release: str) -> list[int]:
    out = tmp_path / f"run{round_}"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / RUN_LOCK).write_text(f"{os.uname().nodename} {dead.pid}")  # a stale lock
    go = tmp_path / f"go{round_}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    processes = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(out), str(go), release], env=env)
        for _ in range(contenders)
    ]
    ready = [tmp_path / f"ready{process.pid}" for process in processes]
    while not all(path.exists() for path in ready):  # all imported, spinning on the signal
        time.sleep(0.01)
    go.touch()
    return [process.wait(timeout=60) for process in processes]


@pytest.mark.parametrize("release", ["release", "die"])
def test_a_stale_lock_is_taken_over_by_one_process_at_a_time(tmp_path: Path, release: str) -> None:
    codes = [code for round_ in range(6) for code in _race(tmp_path, round_, 8, release)]
    assert 4 not in codes, f"{codes.count(4)} processes held the lock together with another"
    assert set(codes) <= {0, 3}, codes
    assert codes.count(0) >= 6  # every round, someone took the stale lock over
