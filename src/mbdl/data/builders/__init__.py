"""Builders of local data sets: code run once to make the files the loaders read, kept apart
from the runtime loaders (which import nothing from here).

- :mod:`mbdl.data.builders.glyphs` renders the glyphs into the cache that
  :mod:`mbdl.data.glyphs` reads (imported by it only when the cache lacks them);
- :mod:`mbdl.data.builders.icons` turns the freedesktop icon themes on disk into an image folder
  for ``data.source=folder`` (``mbdl data icons``: dpkg, CairoSVG, alias classes by union-find).
"""
