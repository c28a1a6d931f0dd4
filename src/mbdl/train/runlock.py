"""One writer per run directory, and no debris left by writers that died.

``out/.lock`` is held with an exclusive ``fcntl.flock`` by the process training into ``out``
(and holds its ``host pid`` for messages). A second process is refused while the holder lives;
the kernel drops the lock of a process that died, so taking it over is atomic. Once it is held, the
temporary files of atomic writes (``.NAME.XXXX.tmp``) in ``out`` and ``out/checkpoints`` can
only belong to writers that died mid-save: :func:`remove_debris` deletes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from pathlib import Path

from mbdl.config import ConfigError
from mbdl.errors import UserError, terminal_safe

RUN_LOCK = ".lock"
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


#: the run locks this process holds: lock path -> its open, flock-ed descriptor
_HELD: dict[Path, int] = {}


def _read_holder(lock: Path) -> str:
    """The lock's ``host pid``, ``""`` when empty, garbled or gone."""
    try:
        with open(lock, "rb") as file:
            text = file.read(256).decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return ""
    except IsADirectoryError:
        raise UserError(f"{terminal_safe(lock)} is a directory; remove it") from None
    host, _, pid = text.partition(" ")
    return text if host and pid.isdigit() else ""


def acquire_run_lock(out: Path) -> Path:
    """Mark ``out`` as trained into by this process (``out/.lock``, ``flock``-ed, holds
    ``host pid``).

    The lock is an exclusive ``fcntl.flock`` on ``out/.lock`` held for as long as this process
    runs (or until :func:`release_run_lock`): the kernel releases it when the holder dies, so a
    dead holder's lock is free and taking it over is atomic (two processes can never both hold
    it). A second process is refused while the first holds it. A free lock naming a process on
    another host is refused too (its file system may not share locks across hosts). Re-entrant
    within one process.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / RUN_LOCK
    key = lock.absolute()
    if key in _HELD:
        return lock
    if lock.is_dir():
        raise UserError(f"{terminal_safe(lock)} is a directory; remove it")
    while True:
        # read-only: a file system remounted read-only mid-run does not find it open for writing
        handle = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            _refuse(out, lock, _read_holder(lock), held=True)
            time.sleep(0.01)  # the holder is releasing it right now: try again
            continue
        except BaseException:
            os.close(handle)
            raise
        try:
            same = os.fstat(handle).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False  # released (unlinked) between our open and our flock
        if not same:
            os.close(handle)
            continue
        try:
            holder = _read_holder(lock)
            if holder:
                _refuse(out, lock, holder, held=False)
            with open(lock, "w", encoding="utf-8") as file:  # the holder, for messages
                file.write(lock_owner())
        except BaseException:
            os.close(handle)
            raise
        _HELD[key] = handle
        return lock


def _forget_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so the
    lock dies with the process that took it, not with the last of its children."""
    for handle in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(handle)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_locks)


def _refuse(out: Path, lock: Path, holder: str, *, held: bool) -> None:
    """Raise the refusal for a lock held by ``holder`` (``held``: its flock is taken); return
    when the lock may be taken (a free lock of this host, or a holder releasing it)."""
    host, _, pid = holder.partition(" ")
    if holder and host != socket.gethostname():
        raise ConfigError(
            f"out={terminal_safe(out)} is locked by a run on {terminal_safe(host)} "
            f"(pid {pid}); if that run is dead, remove {terminal_safe(lock)}"
        ) from None
    if held:
        shown = f"pid {pid}" if holder else "pid unknown"
        raise ConfigError(
            f"out={terminal_safe(out)} is being trained into by another process "
            f"({shown}); wait for it to finish or choose another out="
        ) from None


def release_run_lock(out: Path) -> None:
    """Remove ``out/.lock`` and release it if this process holds it (best effort: on a file
    system that turned read-only or vanished the file stays; its lock dies with the process)."""
    lock = Path(out) / RUN_LOCK
    handle = _HELD.pop(lock.absolute(), None)
    if handle is None:
        return
    with contextlib.suppress(OSError):
        lock.unlink()  # unlink while holding it: a waiter that opened it sees it vanished
    with contextlib.suppress(OSError):
        os.close(handle)


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
