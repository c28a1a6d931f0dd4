"""Reading a JSON file received from someone else, within bounds.

A file is refused (:class:`mbdl.errors.UserError`, one line naming it) when it is larger than
``max_bytes``, is not UTF-8 JSON, nests deeper than ``max_depth`` or holds more than
``max_items`` values: what it costs to read is bounded by those numbers, not by the file.

(A local reader until ``mbdl.fileio.read_json_bounded`` is the project's one bounded reader.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mbdl.errors import UserError, terminal_safe

#: defaults for the small JSON files that travel with a model (config.json, preprocessing.json)
MAX_BYTES = 16 << 20
MAX_DEPTH = 32
MAX_ITEMS = 1_000_000


def _measure(value: Any, where: str, max_depth: int, max_items: int) -> None:
    """Refuse ``value`` when it nests deeper than ``max_depth`` or holds more than
    ``max_items`` values (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > max_items:
            raise UserError(f"{where}: more than {max_items} JSON values; refusing to read it")
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise UserError(f"{where}: JSON nested deeper than {max_depth} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def read_json_bounded(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
) -> Any:
    """The JSON value in ``path``, read within ``max_bytes``, ``max_depth`` and ``max_items``."""
    file = Path(path)
    where = terminal_safe(file)
    try:
        with file.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise UserError(f"cannot read {where}: {error.strerror or error}") from None
    if len(data) > max_bytes:
        raise UserError(f"{where} is larger than {max_bytes} bytes; refusing to read it")
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise UserError(f"{where}: JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{where} is not valid JSON ({terminal_safe(first)[:200]})") from None
    _measure(value, where, max_depth, max_items)
    return value


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_ITEMS", "read_json_bounded"]
