"""The one writing helper: every output of mbdl goes through here.

- A single file (:func:`atomic_write`, :func:`atomic_write_bytes`, :func:`atomic_write_text`) is
  written into a temporary file ``.NAME.RANDOM.tmp`` in the same directory, flushed to disk
  (``fsync``) and moved into place with ``os.replace``: a reader sees the old file or the new one,
  never half of one. An overwritten file keeps its permissions; a new one gets the permissions a
  plain ``open`` would give.
- Several files committed as one unit (:func:`commit_files`) are written to temporary names
  first; the commit point is one atomic write of a journal listing the moves, which are then
  replayed (and replayed again by :func:`finish_commit` after a crash): the previous output or
  the complete new one, never a mix.
- A directory (:func:`atomic_directory`) is assembled in a staging sibling and swapped in with
  one atomic exchange (``renameat2(RENAME_EXCHANGE)`` where the system has it).
- A target that exists and is not mbdl's own output of that kind is refused (``owned``).
- Whatever the underlying writer raises (``torch.save``'s zip writer raises ``RuntimeError`` on a
  full disk) becomes an ``OSError`` naming the file, the temporary files are removed and the old
  output is left as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from mbdl.errors import UserError, terminal_safe

#: the longest error text of an underlying writer quoted in a message
MESSAGE_CHARS = 200
#: under this many free bytes a writer's failure is taken to be a full disk
_FULL_DISK_BYTES = 1 << 20


def default_file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give (0o666 less the umask); mkstemp uses 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _target_mode(target: Path, default: int) -> int:
    """An existing target's permission bits (kept, never widened), else ``default``."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return default


def naming(error: BaseException, target: Path) -> BaseException:
    """``error`` as the error contract has it: an ``OSError`` that names no file (a full disk
    while writing) named after ``target``; any other failure of an underlying writer (not a
    ``ValueError``, ``MemoryError`` or interrupt) an ``OSError`` naming ``target`` with the
    writer's message cut to one bounded line (``ENOSPC`` when the disk is full)."""
    if isinstance(error, OSError):
        if error.filename is None and error.errno is not None:
            return type(error)(error.errno, error.strerror or str(error), str(target))
        return error
    if not isinstance(error, Exception) or isinstance(error, (ValueError, MemoryError)):
        return error
    if _disk_full(target.parent):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    text = " ".join(str(error).split())
    if len(text) > MESSAGE_CHARS:
        text = text[:MESSAGE_CHARS] + "..."
    return OSError(errno.EIO, f"writing failed ({type(error).__name__}: {text})", str(target))


def _disk_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _FULL_DISK_BYTES


def refuse_foreign(target: Path, owned: Callable[[Path], bool] | None, what: str) -> None:
    """Refuse to replace ``target`` when it exists and ``owned(target)`` says it is not mbdl's
    own output of this kind (``what`` names the kind in the message)."""
    if owned is None or not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not owned(target):
        raise UserError(
            f"{terminal_safe(target)} exists and is not {what}; refusing to replace it "
            "(remove it or choose another output)"
        )


def _host_tag() -> str:
    return "h" + hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def temp_sibling(target: Path, suffix: str = ".tmp") -> Path:
    """A new empty temporary file ``.NAME.hHOSTpid_RANDOM.tmp`` next to ``target`` (the host tag
    and process id let :func:`remove_stale_temps` recognise a dead writer's files)."""
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}.{_host_tag()}{os.getpid()}_", suffix=suffix, dir=target.parent
    )
    os.close(handle)
    return Path(name)


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporary files (and staging directories) that writers of ``target`` on this
    host left when they died (killed mid-write); a live writer's are kept. Returns what was
    removed."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{_host_tag()}(\d+)_[A-Za-z0-9_]+\.tmp$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.match(entry.name)
            if not match or _alive(int(match.group(1))) or entry.is_symlink():
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir():  # the staging directory of atomic_directory
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], Any],
    *,
    owned: Callable[[Path], bool] | None = None,
    what: str = "an mbdl output",
) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place.

    The file is flushed and ``fsync``-ed before the rename; on any failure the temporary file is
    removed, ``path`` is left as it was and the error is raised as :func:`naming` has it.
    """
    target = Path(path)
    refuse_foreign(target, owned, what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        temp = temp_sibling(target)
    except Exception as error:
        raise naming(error, target) from None
    try:
        with open(temp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, _target_mode(target, default_file_mode()))
        os.replace(temp, target)
        _sync_directory(target.parent)
    except BaseException as error:
        mapped = naming(error, target)  # before the unlink frees the space it judges by
        temp.unlink(missing_ok=True)
        raise mapped from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, **options: Any) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda file: file.write(data), **options)


def atomic_write_text(path: str | os.PathLike[str], text: str, **options: Any) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), **options)


def _sync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every system can open a folder)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


# -- several files as one unit -----------------------------------------------------------------


def journal_path(anchor: Path) -> Path:
    """The journal of a multi-file commit whose main file is ``anchor``."""
    return anchor.with_name(f".{anchor.name}.commit")


def commit_files(moves: Mapping[Path, Path], anchor: Path) -> None:
    """Move every finished temporary file (``moves``: temporary -> final) into place as one unit.

    The temporary files must be complete (written and ``fsync``-ed). The commit point is the
    atomic write of a journal next to ``anchor``; the moves are then made, and made again by
    :func:`finish_commit` if this process dies before the journal is removed.
    """
    journal = journal_path(anchor)
    folder = Path(anchor).resolve().parent
    for temp, final in moves.items():
        if Path(temp).resolve().parent != folder or Path(final).resolve().parent != folder:
            raise ValueError(f"commit_files: {temp} and {final} must sit beside {anchor}")
    # names only: the journal stays valid whatever the working directory of the reader
    entries = [[Path(temp).name, Path(final).name] for temp, final in moves.items()]
    try:
        for temp, _ in moves.items():
            os.chmod(temp, default_file_mode())
    except BaseException as error:
        raise naming(error, anchor) from None
    atomic_write_text(journal, json.dumps({"moves": entries}) + "\n")
    finish_commit(anchor)


def finish_commit(anchor: Path) -> bool:
    """Complete a multi-file commit interrupted after its commit point (see :func:`commit_files`);
    returns whether there was one. A journal that does not parse (never fully written: the
    journal itself is written atomically, so this is tampering) is refused."""
    journal = journal_path(anchor)
    if not journal.is_file():
        return False
    try:
        text = journal.read_text(encoding="utf-8")[: 1 << 16]
        moves = json.loads(text)["moves"]
        names = [(str(temp), str(final)) for temp, final in moves]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{terminal_safe(journal)} is not a valid commit journal ({type(error).__name__}); "
            "remove it and write the output again"
        ) from None
    for pair in names:
        if any(name != Path(name).name or name in ("", ".", "..") for name in pair):
            raise UserError(f"{terminal_safe(journal)} names files outside its folder; remove it")
    try:
        for temp_name, final_name in names:
            if (anchor.parent / temp_name).exists():
                os.replace(anchor.parent / temp_name, anchor.parent / final_name)
        _sync_directory(anchor.parent)
        journal.unlink()
    except BaseException as error:
        raise naming(error, anchor) from None
    return True


# -- a directory as one unit -------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(first: Path, second: Path) -> bool:
    """Swap ``first`` and ``second`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); returns
    False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_directory(staging: Path, target: Path, backup: Path) -> None:
    """Put the finished directory ``staging`` at ``target``: one atomic exchange where the
    system has it (the old directory is then removed), else ``target`` renamed to ``backup``
    first (its name is what a reader finds if the process dies between the two renames)."""
    if target.exists() and exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old directory
    elif target.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
        os.replace(staging, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, target)
    _sync_directory(target.parent)


def check_not_mid_replacement(folder: Path) -> None:
    """Refuse ``folder`` when it is missing but its :func:`replace_directory` backup
    (``.NAME.old`` beside it) is not: a replacement was interrupted between its two renames."""
    backup = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and backup.is_dir():
        raise UserError(
            f"{terminal_safe(folder)} does not exist, but {terminal_safe(backup)} does: a "
            "write was interrupted while replacing it; rename that back, or rebuild it"
        )


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str],
    *,
    owned: Callable[[Path], bool] | None = None,
    what: str = "an mbdl output directory",
) -> Iterator[Path]:
    """Yield a staging directory next to ``path``; fill it, and on a clean exit it replaces
    ``path`` in one atomic exchange (the old directory is then removed). An existing ``path``
    that is neither empty nor ``owned`` is refused before anything is written; on any failure
    the staging directory is removed and ``path`` is left as it was."""
    target = Path(path)
    if target.exists() and not (target.is_dir() and not target.is_symlink() and _empty(target)):
        refuse_foreign(target, owned or (lambda _: False), what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        staging = Path(
            tempfile.mkdtemp(
                prefix=f".{target.name}.{_host_tag()}{os.getpid()}_",
                suffix=".tmp",
                dir=target.parent,
            )
        )
    except Exception as error:
        raise naming(error, target) from None
    try:
        yield staging
        os.chmod(staging, _target_mode(target, 0o777 & ~_umask()))
        replace_directory(
            staging, target, staging.with_name(staging.name[: -len(".tmp")] + "_old.tmp")
        )
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise naming(error, target) from None


def _empty(folder: Path) -> bool:
    return not any(folder.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- reading back ------------------------------------------------------------------------------

#: default bounds of :func:`read_json_bounded`
JSON_MAX_BYTES = 16 << 20
JSON_MAX_DEPTH = 32
JSON_MAX_ITEMS = 1_000_000
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def read_json_bounded(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = JSON_MAX_BYTES,
    max_depth: int = JSON_MAX_DEPTH,
    max_items: int = JSON_MAX_ITEMS,
) -> Any:
    """The JSON value in ``path``, read within bounds: at most ``max_bytes`` bytes, containers
    nested at most ``max_depth`` deep and at most ``max_items`` values in all (checked on the
    text before parsing, so a hostile file costs no more than its bounded size). Anything else,
    or text that is not UTF-8 JSON, is a one-line :class:`UserError` naming the file."""
    file = Path(path)
    name = terminal_safe(file)
    if not file.is_file():
        raise UserError(f"{name} does not exist or is not a regular file")
    with open(file, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{name} is larger than {max_bytes} bytes; refusing to read it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text") from None
    strings = len(_JSON_STRING.findall(text))
    skeleton = np.frombuffer(_JSON_STRING.sub("0", text).encode("utf-8"), dtype=np.uint8)
    opens = (skeleton == ord("[")) | (skeleton == ord("{"))
    closes = (skeleton == ord("]")) | (skeleton == ord("}"))
    depth = np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
    if depth.size and int(depth.max()) > max_depth:
        raise UserError(f"{name} nests deeper than {max_depth} levels; refusing to read it")
    items = strings + int(opens.sum()) + int((skeleton == ord(",")).sum())
    if items > max_items:
        raise UserError(f"{name} holds more than {max_items} values; refusing to read it")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        message = " ".join(str(error).split())[:MESSAGE_CHARS]
        raise UserError(f"{name} is not valid JSON ({message})") from None


__all__ = [
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit_files",
    "default_file_mode",
    "finish_commit",
    "naming",
    "read_json_bounded",
    "refuse_foreign",
    "remove_stale_temps",
    "temp_sibling",
]
