"""The error contract: one base class for mistakes a user can fix, and terminal-safe text.

Every error caused by bad input (a config key or value, a file that is missing, unreadable,
truncated or tampered with, a checkpoint or index that does not match, a full disk, a missing
permission, memory exhausted by a request) is, or is turned into, a :class:`UserError`; the
``mbdl`` command prints it as one line and exits with code 2. A diverged run exits with 1, an
interrupt with 130; ``MBDL_DEBUG=1`` shows the traceback instead.

:class:`UserError` subclasses ``ValueError`` so code that caught ``ValueError`` for bad input
keeps working.
"""

from __future__ import annotations

import errno
import re
import unicodedata

#: exit codes of the ``mbdl`` command
EXIT_OK, EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(ValueError):
    """Bad input that the user can fix; the message names the input and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss (or the gradients, or the weights) became NaN or Inf; the run stopped."""


_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space or choose another out=",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another out=",
    errno.EACCES: "permission denied; check the file's permissions or choose another path",
    errno.EPERM: "operation not permitted; check the file's permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose a writable out=",
}


def describe_os_error(error: OSError) -> str:
    """One line for an ``OSError``: the file, the system's reason and, where known, the fix."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = _OS_HINTS.get(error.errno or 0)
    where = f"{error.filename}: " if error.filename is not None else ""
    if error.filename2 is not None:
        where = f"{error.filename} -> {error.filename2}: "
    return f"{where}{reason}" + (f" ({hint})" if hint else "")


def terminal_safe(text: object) -> str:
    """``text`` with control and format characters (escape sequences, carriage returns, bidi
    overrides, newlines) written as ``\\xNN`` / ``\\uNNNN``, so a file or class name read from
    disk cannot move the cursor, recolour or rewrite the terminal, or forge extra lines."""
    out = []
    for char in str(text):
        if char == "\t" or unicodedata.category(char) not in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def one_line(error: BaseException) -> str:
    """An exception as one terminal-safe line (whitespace runs collapsed); an error re-raised
    from a DataLoader worker process as its own message, without the worker's traceback."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.strerror:
        text = describe_os_error(error)
    else:
        text = from_loader_worker(str(error))
    return terminal_safe(" ".join(text.split())) or type(error).__name__


def from_loader_worker(text: str) -> str:
    """The original message of an error that torch re-raised from a DataLoader worker ("Caught
    X in DataLoader worker process N. Original Traceback ... module.X: message"), else ``text``."""
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return re.sub(r"^[A-Za-z_][\w.]*: ", "", last.strip(), count=1)
