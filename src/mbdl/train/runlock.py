"""One writer per run directory, and no debris left by writers that died.

``out/.lock`` holds ``host pid`` of the process training into ``out``. A second process is
refused while the holder is alive; a lock whose holder died (on this host), one left by this
same process, and an empty or unreadable-content lock older than :data:`EMPTY_LOCK_GRACE_S`
(a writer killed between creating and filling it) are taken over. Once the lock is held, the
temporary files of atomic writes (``.NAME.XXXX.tmp``) in ``out`` and ``out/checkpoints`` can
only belong to writers that died mid-save: :func:`remove_debris` deletes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

from mbdl.config import ConfigError
from mbdl.errors import UserError, terminal_safe

RUN_LOCK = ".lock"
#: an empty lock younger than this may belong to a writer that is filling it: wait
EMPTY_LOCK_GRACE_S = 5.0
#: the temporary files of mbdl.fileio / checkpoint atomic writes: ``.NAME.RANDOM.tmp``
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def lock_owner() -> str:
    """This process as a lock holder: ``host pid``."""
    return f"{socket.gethostname()} {os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(lock: Path) -> str | None:
    """The lock's ``host pid``, ``""`` when empty or garbled, None when it vanished."""
    try:
        text = lock.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise UserError(f"{terminal_safe(lock)} is a directory; remove it") from None
    host, _, pid = text.partition(" ")
    return text if host and pid.isdigit() else ""


def acquire_run_lock(out: Path) -> Path:
    """Mark ``out`` as trained into by this process (``out/.lock`` holds ``host pid``).

    Two processes writing one run directory would interleave their logs and checkpoints, so a
    second one is refused while the first is alive; a lock left by a process that died (or by
    this same process, after an interrupted run), or an empty one older than
    :data:`EMPTY_LOCK_GRACE_S`, is taken over.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = out / RUN_LOCK
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder is None:
                continue
            if holder == "":
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < EMPTY_LOCK_GRACE_S:  # perhaps being written right now
                    time.sleep(0.05)
                    continue
            elif holder != lock_owner():
                host, _, pid = holder.partition(" ")
                if host != socket.gethostname():
                    raise ConfigError(
                        f"out={terminal_safe(out)} is locked by a run on {terminal_safe(host)} "
                        f"(pid {pid}); if that run is dead, remove {terminal_safe(lock)}"
                    ) from None
                if process_alive(int(pid)):
                    raise ConfigError(
                        f"out={terminal_safe(out)} is being trained into by another process "
                        f"(pid {pid}); wait for it to finish or choose another out="
                    ) from None
            lock.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(lock_owner())
        except BaseException:
            lock.unlink(missing_ok=True)  # never leave an empty lock behind
            raise
        return lock


def release_run_lock(out: Path) -> None:
    """Remove ``out/.lock`` if this process holds it (best effort: on a file system that turned
    read-only or vanished the lock stays, and this process's next start takes it over)."""
    lock = out / RUN_LOCK
    with contextlib.suppress(OSError):
        if lock.read_text(encoding="utf-8", errors="replace").strip() == lock_owner():
            lock.unlink()


def remove_debris(out: Path) -> list[Path]:
    """Delete the temporary files of atomic writes in ``out`` and ``out/checkpoints`` (call it
    while holding the run lock: they can only be a dead writer's); returns what was removed."""
    removed = []
    for folder in (out, out / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _TEMP_FILE.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
