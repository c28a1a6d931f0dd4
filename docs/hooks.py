"""mkdocs hooks: regenerate the reference pages and derive the losses' pages from the code.

- ``on_pre_build``: scripts/gen_docs.py regenerates configuration.md and cli.md; it rewrites a
  page only when its content changed, so ``mkdocs serve`` does not rebuild in a loop.
- ``on_config``: every ``docs/losses/*.md`` page joins the nav's Losses section (titled by its
  first heading), so a new loss's page needs no mkdocs.yml edit.
- ``on_page_markdown``: the ``<!-- losses-table -->`` marker of losses/index.md becomes the
  table of the registered losses (``mbdl.losses.LOSSES``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_docs.py"
LOSSES_SECTION = "Losses"
LOSSES_TABLE_MARKER = "<!-- losses-table -->"


def _gen_docs() -> Any:
    spec = importlib.util.spec_from_file_location("mbdl_gen_docs", _SCRIPT)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config: Any, **kwargs: Any) -> None:
    _gen_docs().generate(Path(config["docs_dir"]))


def _listed(nav: list[Any]) -> set[str]:
    found: set[str] = set()
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found |= _listed(value) if isinstance(value, list) else {value}
    return found


def page_title(page: Path) -> str:
    """The nav title of a page: its first heading up to a colon (``# MDL: ...`` -> ``MDL``)."""
    return str(_gen_docs().page_heading(page)).split(":")[0].strip()


def with_loss_pages(nav: list[Any], docs_dir: Path) -> list[Any]:
    """``nav`` with every ``losses/*.md`` page it does not list yet appended to its Losses
    section (in file-name order)."""
    listed = _listed(nav)
    extra = [
        {page_title(page): f"losses/{page.name}"}
        for page in sorted((docs_dir / "losses").glob("*.md"))
        if f"losses/{page.name}" not in listed
    ]
    for entry in nav:
        if isinstance(entry, dict) and isinstance(entry.get(LOSSES_SECTION), list):
            entry[LOSSES_SECTION].extend(extra)
            return nav
    raise RuntimeError(f"mkdocs.yml's nav has no {LOSSES_SECTION!r} section for docs/losses/")


def on_config(config: Any, **kwargs: Any) -> Any:
    config["nav"] = with_loss_pages(config["nav"], Path(config["docs_dir"]))
    return config


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "losses/index.md" and LOSSES_TABLE_MARKER in markdown:
        return markdown.replace(LOSSES_TABLE_MARKER, _gen_docs().losses_table())
    return markdown
