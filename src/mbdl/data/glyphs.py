"""The embedded ``glyphs`` data set: characters rendered from the fonts matplotlib ships.

A class is a character covered by all 16 faces in :data:`FACES` (DejaVu Sans, Serif and Sans
Mono, STIX General, 4 styles each); its 16 instances are its renderings in those faces (training
adds a small affine jitter through :func:`mbdl.data.build_transforms`). Each character is drawn
with PIL, white on black, in a ``size x size`` grey canvas (32 by default) at a font size of
``round(size * 22 / 32)`` pixels, centred horizontally and on a fixed baseline at
``round(size * 0.75)`` so that ``o`` and ``O`` differ. Characters are kept in code-point order;
a character is dropped when it is a control, format or separator character, when its rendering in
any face is blank, or when its rendering in :data:`REFERENCE_FACE` is pixel-equal to an earlier
kept character's (Latin A / Greek Alpha / Cyrillic A keep only Latin A). About 670 classes remain.

The rendering (:mod:`mbdl.data.builders.glyphs`, imported only to fill the cache) is
deterministic and cached as ``glyphs-<key>.npz`` in the cache directory
(``$MBDL_CACHE`` or ``~/.cache/mbdl``), the key hashing the rendering parameters, the font files'
names and sizes, Pillow's and FreeType's versions and :data:`GLYPHS_VERSION`; any change gives a
new file (built in about a second), written atomically.

Splits are class-disjoint. The test classes are the first ``round(test_fraction * C)`` of a
permutation of the classes seeded with :data:`TEST_SPLIT_SEED` (fixed, independent of the training
seed, so every run is tested on the same classes); validation classes are carved from the training
classes with ``val_fraction`` and ``seed``. ``max_classes`` keeps the first classes of each side
in that same permutation, so a small run's test classes are test classes of the full set too.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import __version__ as pillow_version
from PIL import features as pil_features

from mbdl.data.base import Splits
from mbdl.data.splits import ArrayImageDataset, carve_validation_classes

#: bump when the rendering or the selection of characters changes
GLYPHS_VERSION = 1

#: the 16 faces (font file stems under matplotlib's ``mpl-data/fonts/ttf``), one instance each
FACES = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
)

#: the face in which identical renderings are merged
REFERENCE_FACE = "DejaVuSans"

#: seed of the fixed class permutation that chooses the test classes
TEST_SPLIT_SEED = 0

DEFAULT_SIZE = 32


@dataclass(frozen=True)
class GlyphSet:
    """The rendered glyphs: ``images[c, f]`` is character ``codepoints[c]`` in face ``faces[f]``."""

    images: np.ndarray  # uint8 [C, F, size, size]
    codepoints: np.ndarray  # int64 [C]
    faces: tuple[str, ...]
    path: Path
    build_seconds: float
    params: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return [f"U+{cp:04X} {chr(cp)!r}" for cp in self.codepoints]


def font_dir() -> Path:
    """matplotlib's directory of TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def default_cache_dir() -> Path:
    """``$MBDL_CACHE`` or ``~/.cache/mbdl``."""
    return Path(os.environ.get("MBDL_CACHE") or Path.home() / ".cache" / "mbdl")


def font_size_for(size: int) -> int:
    return round(size * 22 / 32)


def rendering_params(size: int = DEFAULT_SIZE, font_size: int | None = None) -> dict[str, Any]:
    """Everything the rendering depends on (the cache key hashes it)."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"glyph image size must be an integer >= 8, got {size!r}")
    font_size = font_size_for(size) if font_size is None else font_size
    if not isinstance(font_size, int) or font_size < 4:
        raise ValueError(f"glyph font size must be an integer >= 4, got {font_size!r}")
    fonts = font_dir()
    missing = [face for face in FACES if not (fonts / f"{face}.ttf").is_file()]
    if missing:
        raise ValueError(f"matplotlib's font directory {fonts} lacks {', '.join(missing)}")
    return {
        "version": GLYPHS_VERSION,
        "size": size,
        "font_size": font_size,
        "baseline": round(size * 0.75),
        "faces": [[face, (fonts / f"{face}.ttf").stat().st_size] for face in FACES],
        "reference_face": REFERENCE_FACE,
        "pillow": pillow_version,
        "freetype": pil_features.version("freetype2"),
    }


def cache_path(params: dict[str, Any], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"glyphs-{key}.npz"


def load_glyphs(
    size: int = DEFAULT_SIZE,
    *,
    font_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
) -> GlyphSet:
    """The glyphs for these parameters, from the cache or rendered (and cached) now by
    :mod:`mbdl.data.builders.glyphs`, imported only then."""
    params = rendering_params(size, font_size)
    path = cache_path(params, cache_dir)
    if path.is_file() and not rebuild:
        try:
            with np.load(path, allow_pickle=False) as data:
                if json.loads(str(data["params"])) == params:
                    return GlyphSet(
                        images=data["images"],
                        codepoints=data["codepoints"],
                        faces=FACES,
                        path=path,
                        build_seconds=float(data["build_seconds"]),
                        params=params,
                    )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable or stale: rebuild below
    from mbdl.data.builders import glyphs as renderer  # only when the cache lacks them

    images, codepoints, seconds = renderer.render_to_cache(params, path)
    return GlyphSet(images, codepoints, FACES, path, seconds, params)


def glyph_dataset(glyphs: GlyphSet, classes: np.ndarray) -> ArrayImageDataset:
    """The instances of ``classes`` (indices into ``glyphs``), labelled ``0..len(classes)-1``."""
    classes = np.asarray(classes, dtype=np.int64)
    num_faces = len(glyphs.faces)
    size = glyphs.images.shape[-1]
    images = glyphs.images[classes].reshape(-1, size, size)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), num_faces)
    names = glyphs.class_names
    descriptions = [f"{names[c]} {face}" for c in classes for face in glyphs.faces]
    return ArrayImageDataset(images, labels, [names[c] for c in classes], descriptions)


def split_classes(
    num_classes: int, test_fraction: float, max_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_classes, test_classes)``: the fixed test permutation, see the module docstring."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_classes)
    num_test = round(test_fraction * num_classes)
    test, train = order[:num_test], order[num_test:]
    if max_classes is not None:
        if not 4 <= max_classes <= num_classes:
            raise ValueError(f"max_classes must be in 4..{num_classes}, got {max_classes}")
        keep_test = min(max(1, round(test_fraction * max_classes)), max_classes - 2)
        test, train = test[:keep_test], train[: max_classes - keep_test]
    return np.sort(train), np.sort(test)


def load_splits(
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = DEFAULT_SIZE,
    val_fraction: float = 0.15,
    seed: int = 0,
    test_fraction: float = 0.5,
    max_classes: int | None = None,
    channels: int = 1,
    **unknown: Any,
) -> Splits:
    """Class-disjoint glyph splits (``root``: the cache directory, default ``$MBDL_CACHE``).

    Options: ``test_fraction`` (0.5), ``max_classes`` (a deterministic subset), ``channels``
    (1, or 3 to repeat the grey image for torchvision backbones). No transforms are attached
    (:func:`mbdl.data.load_splits` attaches them).
    """
    if unknown:
        allowed = "test_fraction, max_classes, channels"
        raise ValueError(f"unknown glyphs option(s) {sorted(unknown)}; allowed: {allowed}")
    glyphs = load_glyphs(image_size, cache_dir=root)
    train_classes, test_classes = split_classes(len(glyphs.codepoints), test_fraction, max_classes)
    per_class = np.repeat(train_classes, len(glyphs.faces))
    train_idx, val_idx = carve_validation_classes(per_class, val_fraction, seed)
    splits = Splits(
        train=glyph_dataset(glyphs, np.unique(per_class[train_idx])),
        val=glyph_dataset(glyphs, np.unique(per_class[val_idx])),
        test=glyph_dataset(glyphs, test_classes),
        channels=channels,
        image_size=image_size,
        source="glyphs",
        info={
            "cache": str(glyphs.path),
            "num_classes": len(glyphs.codepoints),
            "faces": list(glyphs.faces),
            "test_split_seed": TEST_SPLIT_SEED,
        },
    )
    return splits


def describe_glyphs(
    cache_dir: str | os.PathLike[str] | None = None, size: int = DEFAULT_SIZE
) -> str:
    """A short summary for ``mbdl data glyphs``: counts, cache file, build time, default split."""
    glyphs = load_glyphs(size, cache_dir=cache_dir)
    num_classes, num_faces = glyphs.images.shape[:2]
    train, test = split_classes(num_classes, 0.5, None)
    val = max(1, round(0.15 * len(train)))
    return "\n".join(
        [
            f"glyphs: {num_classes} classes x {num_faces} faces = {num_classes * num_faces} images"
            f" of {size}x{size} (grey, font size {glyphs.params['font_size']} px)",
            f"faces: {', '.join(glyphs.faces)}",
            f"cache: {glyphs.path} (rendered in {glyphs.build_seconds:.2f} s)",
            f"default split: {len(train) - val} train / {val} validation / {len(test)} test classes"
            f" (test chosen with the fixed seed {TEST_SPLIT_SEED})",
        ]
    )


#: names that moved to the renderer, :mod:`mbdl.data.builders.glyphs` (still importable here)
RENDERER_NAMES = frozenset({"build_glyphs", "common_codepoints", "render"})


def __getattr__(name: str) -> Any:
    if name in RENDERER_NAMES:  # imported on first use: loading the glyphs never needs it
        from mbdl.data.builders import glyphs as renderer

        return getattr(renderer, name)
    raise AttributeError(f"module 'mbdl.data.glyphs' has no attribute {name!r}")
