"""Rendering the ``glyphs`` data set: what :mod:`mbdl.data.glyphs` (the loader) runs, importing
this module, only when its cache lacks the glyphs for the parameters asked.

Each character every face maps (less control, format and separator characters) is drawn with
PIL, white on black, centred on the baseline; a character is dropped when it is blank in some
face or renders like an earlier character in the reference face. The result is written to the
cache atomically (a temporary file renamed).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mbdl.data.glyphs import FACES, font_dir


def common_codepoints(faces: tuple[str, ...] = FACES) -> list[int]:
    """Code points every face maps (its cmap), less control, format and separator characters."""
    from fontTools.ttLib import TTFont

    common: set[int] | None = None
    for face in faces:
        cmap = set(TTFont(str(font_dir() / f"{face}.ttf"), lazy=True).getBestCmap())
        common = cmap if common is None else common & cmap
    return sorted(cp for cp in common or () if unicodedata.category(chr(cp))[0] not in "CZ")


def render(font: ImageFont.FreeTypeFont, char: str, size: int, baseline: int) -> np.ndarray:
    """``char`` white on black in a ``size x size`` canvas, centred, on the baseline."""
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).text((size / 2, baseline), char, font=font, fill=255, anchor="ms")
    return np.asarray(canvas)


def build_glyphs(params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Render and select the characters: ``(images uint8 [C, F, S, S], codepoints int64 [C])``."""
    size, baseline = params["size"], params["baseline"]
    faces = tuple(face for face, _ in params["faces"])
    fonts = [ImageFont.truetype(str(font_dir() / f"{f}.ttf"), params["font_size"]) for f in faces]
    reference = faces.index(params["reference_face"])
    seen: set[bytes] = set()
    images, codepoints = [], []
    for cp in common_codepoints(faces):
        stack = np.stack([render(font, chr(cp), size, baseline) for font in fonts])
        if not stack.reshape(len(fonts), -1).max(axis=1).all():  # blank in some face
            continue
        key = stack[reference].tobytes()
        if key in seen:  # renders like an earlier character in the reference face
            continue
        seen.add(key)
        images.append(stack)
        codepoints.append(cp)
    return np.stack(images), np.asarray(codepoints, dtype=np.int64)


def _write_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_to_cache(params: dict[str, Any], path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """Render the glyphs of ``params`` (:func:`mbdl.data.glyphs.rendering_params`) and write
    them to the cache file ``path`` atomically; ``(images, codepoints, seconds to render)``."""
    start = time.perf_counter()
    images, codepoints = build_glyphs(params)
    seconds = time.perf_counter() - start
    _write_npz_atomically(
        path,
        images=images,
        codepoints=codepoints,
        params=np.asarray(json.dumps(params, sort_keys=True)),
        build_seconds=np.asarray(seconds),
    )
    return images, codepoints, seconds
