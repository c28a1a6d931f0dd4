"""Data sources, declared once: the :data:`SOURCES` registry behind ``data.source``.

A source is a function ``load_splits(root, *, image_size, val_fraction, seed, **options) ->
Splits`` (the class-disjoint train / validation / test splits, see :class:`mbdl.data.Splits`)
plus a few facts about it (:class:`Source`). ``data.source`` takes a built-in name, the name an
installed package declares in the entry-point group ``mbdl.sources``::

    [project.entry-points."mbdl.sources"]
    my_data = "my_pkg.data:load_splits"

or an import path, ``data.source=my_pkg.data:load_splits``. A plugin may be a bare function (it
then gets ``root`` as given, possibly None, and ``image_size`` 224 unless ``data.image_size``
says otherwise) or a :class:`Source` that states those facts. ``options`` are the
``data.*`` keys the function names among its keyword parameters (``skip_corrupt``, ``bbox``,
``max_classes``, ...); a key the user set that the function does not take is an error.

A source returns its splits without transforms (every dataset's ``transform`` None):
:func:`mbdl.data.load_splits` attaches the default ones, once the image size (possibly picked
from the images) and the preprocessing statistics of the backbone's weights are known, with
``data.augment``. Plugins written for the earlier contract keep working: a function that still
names ``augment`` / ``imagenet_norm`` among its keyword parameters receives them, and a dataset
it gave a transform keeps it (only datasets whose ``transform`` is None get the defaults; a
plugin that sets its own transforms owns its image size and normalisation).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from mbdl.data.base import Splits
from mbdl.plugins import PluginError, Registry, import_object

#: the keyword arguments every source function is called with (besides ``root``)
REQUIRED_KEYWORDS = ("image_size", "val_fraction", "seed")

#: channel counts the models and checkpoints support
CHANNELS = (1, 3)


@dataclass(frozen=True)
class Source:
    """One data source: how to load it and what the rest of mbdl needs to know about it.

    Attributes:
        load: ``(root, *, image_size, val_fraction, seed, **options) -> Splits``, or its import
            path ``package.module:function`` (imported only when the source is used).
        needs_root: whether ``data.root`` must be set (checked with the config).
        image_size: the input side when ``data.image_size`` is null (file sources then pick it
            from the training images when a backbone is named).
        fixed_size: all images have one size, so no size is picked from the files.
    """

    load: Callable[..., Splits] | str
    needs_root: bool = True
    image_size: int = 224
    fixed_size: bool = False

    def function(self) -> Callable[..., Splits]:
        """The loading function (imported on first use for a built-in source)."""
        if isinstance(self.load, str):
            return import_object(self.load, kind="data source")
        return self.load

    def accepts(self, option: str) -> bool:
        """Whether the loading function takes the keyword ``option`` by name."""
        return option in inspect.signature(self.function()).parameters


BUILTIN_SOURCES: dict[str, Source] = {
    "glyphs": Source(
        "mbdl.data.glyphs:load_splits", needs_root=False, image_size=32, fixed_size=True
    ),
    "folder": Source("mbdl.data.folder:load_splits"),
    "csv": Source("mbdl.data.csv:load_splits"),
    "idx": Source("mbdl.data.idx:load_splits", image_size=32, fixed_size=True),
    "cub": Source("mbdl.data.cub:load_splits"),
    "cars": Source("mbdl.data.cars:load_splits"),
    "sop": Source("mbdl.data.sop:load_splits"),
    "inshop": Source("mbdl.data.inshop:load_splits"),
    "hf": Source("mbdl.data.hf:load_splits", fixed_size=True),
    "webdataset": Source("mbdl.data.webdataset:load_splits", fixed_size=True),
}


def check_signature(function: Callable[..., object], name: str) -> None:
    """Refuse a loading function that cannot be called as ``function(root, *, image_size,
    val_fraction, seed)`` (a :class:`mbdl.plugins.PluginError` naming the expected signature)."""
    expected = "(root, *, image_size, val_fraction, seed, **options) -> Splits"
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin without a signature: it is checked by calling it
    try:
        signature.bind(None, image_size=32, val_fraction=0.15, seed=0)
    except TypeError as error:
        raise PluginError(
            f"data source {name!r}: its function {signature} cannot be called as "
            f"{expected} ({error})"
        ) from None


def check_source(found: object, name: str) -> Source:
    """A registry entry as a :class:`Source`: a ``Source`` as it is, a function wrapped in one
    (no root needed, 224 px by default); its function's signature checked when it is in hand."""
    if isinstance(found, Source):
        source = found
    elif callable(found):
        source = Source(found, needs_root=False)
    else:
        raise PluginError(
            f"data source {name!r} is a {type(found).__name__}, not a function "
            "(root, *, image_size, val_fraction, seed, **options) -> Splits or an "
            "mbdl.data.sources.Source"
        )
    if not isinstance(source.load, str):
        check_signature(source.load, name)
    return source


def check_splits(splits: object, name: str) -> Splits:
    """Refuse what a source function returned unless it is a usable :class:`Splits`."""
    if not isinstance(splits, Splits):
        raise PluginError(
            f"data source {name!r} returned a {type(splits).__name__}, not mbdl.data.Splits"
        )
    if splits.channels not in CHANNELS:
        raise PluginError(
            f"data source {name!r}: Splits.channels is {splits.channels!r}; must be 1 or 3"
        )
    for split in ("train", "val", "test"):
        dataset = getattr(splits, split)
        if not hasattr(dataset, "labels") or not hasattr(dataset, "__getitem__"):
            raise PluginError(
                f"data source {name!r}: Splits.{split} is a {type(dataset).__name__}, not an "
                "mbdl.data.ImageDataset"
            )
    return splits


def _declared(source: Source) -> Callable[[], Source]:
    return lambda: source


#: every ``data.source``: built-in names, installed plugins (group ``mbdl.sources``), import paths
SOURCES: Registry[Source] = Registry(
    "data source",
    "mbdl.sources",
    {name: _declared(source) for name, source in BUILTIN_SOURCES.items()},
    check_source,
)
