"""Catalog search: index a folder of images with a trained model, keep it current, search it.

``build_catalog(model, "catalog.index", images="photos/")`` embeds every image below a folder
into an index directory (:mod:`mbdl.catalog.store`); :func:`add_to_catalog` and
:func:`remove_from_catalog` keep it current; :class:`Searcher` (or :func:`search`) answers
queries by image or embedding.
"""

from __future__ import annotations

from mbdl.catalog.build import (
    BuildReport,
    add_to_catalog,
    build_catalog,
    list_sources,
    remove_from_catalog,
)
from mbdl.catalog.factory import check_factory, default_factory
from mbdl.catalog.search import Neighbour, QueryResult, Searcher, search
from mbdl.catalog.store import Catalog, Item

__all__ = [
    "BuildReport",
    "Catalog",
    "Item",
    "Neighbour",
    "QueryResult",
    "Searcher",
    "add_to_catalog",
    "build_catalog",
    "check_factory",
    "default_factory",
    "list_sources",
    "remove_from_catalog",
    "search",
]
