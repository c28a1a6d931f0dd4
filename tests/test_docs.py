"""The documentation: its code examples run, its generated pages are up to date, the site builds.

Every fenced ``python`` block of a page (docs/**/*.md and README.md) is executed, the blocks of a
page in order and in one namespace, as a reader would paste them. Blocks in other languages
(``bash``, ``text``, ``yaml``) are not executed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)
MDL_STATEMENT = "reconstructed from the abstract; the paper's exact formula may differ"


def _load_gen_docs():
    spec = importlib.util.spec_from_file_location("mbdl_gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ``python`` code blocks of a markdown text, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("lang") in ("python", "py"):
            indent = match.group("indent")
            lines = match.group("body").splitlines()
            blocks.append("\n".join(line.removeprefix(indent) for line in lines))
    return blocks


SEQUENTIAL = "<!-- docs-test: sequential -->"  # pages whose own test runs commands + Python


def _pages_with_code() -> list[Path]:
    pages = [*PAGES, ROOT / "README.md"]
    return [
        p
        for p in pages
        if p.exists()
        and python_blocks(p.read_text(encoding="utf-8"))
        and SEQUENTIAL not in p.read_text(encoding="utf-8")
    ]


def _nav_pages(nav: list) -> list[str]:
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            found.extend(_nav_pages(value))
        else:
            found.append(value)
    return found


def _mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use !!python/name tags; they do not matter here
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def test_python_blocks_are_found() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n  ```python\n  y = 2\n  ```\n"
    assert python_blocks(text) == ["x = 1", "y = 2"]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # the examples are tiny: one thread avoids thread start-up and spinning on a busy machine
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__docs__"}
    try:
        for number, block in enumerate(python_blocks(page.read_text(encoding="utf-8")), start=1):
            code = compile(block, f"{page.relative_to(ROOT)}[python block {number}]", "exec")
            exec(code, namespace)
    finally:
        torch.set_num_threads(threads)


def _load_hooks():
    spec = importlib.util.spec_from_file_location("mbdl_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _site_nav() -> list:
    """mkdocs.yml's nav as the build sees it (docs/hooks.py adds the loss pages)."""
    return _load_hooks().with_loss_pages(_mkdocs_config()["nav"], DOCS)


def test_every_page_is_in_the_nav() -> None:
    nav = _nav_pages(_site_nav())
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert pages - set(nav) == set(), "pages missing from mkdocs.yml's nav"
    assert set(nav) - pages == set(), "nav entries without a page"
    assert len(nav) == len(set(nav)), "a page listed twice"


def test_a_new_loss_page_joins_the_losses_nav(tmp_path: Path) -> None:
    (tmp_path / "losses").mkdir()
    (tmp_path / "losses" / "index.md").write_text("# Losses\n")
    (tmp_path / "losses" / "newloss.md").write_text("# NewLoss: a new loss\n")
    nav = [{"Home": "index.md"}, {"Losses": [{"Overview": "losses/index.md"}]}]
    assert _load_hooks().with_loss_pages(nav, tmp_path)[1]["Losses"] == [
        {"Overview": "losses/index.md"},
        {"NewLoss": "losses/newloss.md"},
    ]


def test_losses_table_lists_every_registered_loss() -> None:
    from mbdl.losses import LOSSES, loss_class

    table = _load_gen_docs().losses_table()
    text = (DOCS / "losses" / "index.md").read_text(encoding="utf-8")
    assert _load_hooks().LOSSES_TABLE_MARKER in text
    for name in LOSSES.names():
        cls = loss_class(name)
        param, values = cls.search_grid
        assert f"| `{name}` | [" in table and f"({name}.md)" in table, name
        assert f"`{cls.__name__}`" in table and f"`{param}` in {values[0]:g}" in table, name


def test_every_loss_has_a_page_with_its_class() -> None:
    from mbdl.losses import LOSSES, loss_class

    for name in LOSSES.names():
        found = loss_class(name)
        module, cls = found.__module__, found.__name__
        text = (DOCS / "losses" / f"{name}.md").read_text(encoding="utf-8")
        assert f"::: {module}.{cls}" in text, f"docs/losses/{name}.md does not document {cls}"
        assert "**Paper" in text, f"docs/losses/{name}.md does not cite its paper"
        assert "$$" in text, f"docs/losses/{name}.md has no equation"


def test_mdl_pages_say_the_formula_is_a_reconstruction() -> None:
    for page in ("concepts.md", "losses/mdl.md", "index.md"):
        text = " ".join((DOCS / page).read_text(encoding="utf-8").split()).replace("**", "")
        assert MDL_STATEMENT in text.lower(), page


def test_generator_rewrites_only_changed_pages(tmp_path: Path) -> None:
    gen_docs = _load_gen_docs()
    assert sorted(gen_docs.generate(tmp_path)) == ["cli.md", "configuration.md"]
    assert gen_docs.generate(tmp_path) == []  # unchanged: nothing rewritten (no serve loop)
    assert gen_docs.generate(tmp_path, check=True) == []
    (tmp_path / "cli.md").write_text("stale\n", encoding="utf-8")
    assert gen_docs.generate(tmp_path, check=True) == ["cli.md"]
    assert (tmp_path / "cli.md").read_text(encoding="utf-8") == "stale\n"


def test_configuration_page_lists_every_key_and_loss_parameter() -> None:
    from mbdl.config import CONFIG_SCHEMA, loss_parameters
    from mbdl.data import SOURCES
    from mbdl.losses import LOSSES
    from mbdl.models import BACKBONES

    gen_docs = _load_gen_docs()
    text = gen_docs.configuration_page()
    for key, declared in CONFIG_SCHEMA.items():
        assert f"| `{key}` |" in text, key
        assert (
            f"| `{key}` | {gen_docs._type_text(declared.type)} | "
            f"`{gen_docs._yaml_value(declared.default)}` |" in text
        ), key
        for value in declared.choices or ():
            assert f"`{value}`" in text, (key, value)
        if declared.minimum is not None:
            assert f">= {declared.minimum:g}" in text, key
    # the values of the registry-backed keys are the registries' names
    source_row = next(line for line in text.splitlines() if line.startswith("| `data.source`"))
    backbone_row = next(line for line in text.splitlines() if line.startswith("| `model.backbone`"))
    for name in SOURCES.builtin_names():
        assert name in source_row, name
    for name in BACKBONES.builtin_names():
        assert name in backbone_row, name
    assert "timm/<name>" in backbone_row and "package.module:" in source_row
    for name in LOSSES.names():
        for param in loss_parameters(name):
            assert f"`loss.{param}=" in text, (name, param)


def test_cli_page_lists_every_subcommand_and_option() -> None:
    import argparse

    from mbdl.cli import build_parser

    text = _load_gen_docs().cli_page()
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                assert f"## `mbdl {name}`" in text, name
                for sub_action in sub._actions:
                    if isinstance(sub_action, argparse._HelpAction):
                        continue
                    for option in sub_action.option_strings:
                        assert f"`{option}`" in text, (name, option)


def test_site_has_no_external_scripts_or_fonts() -> None:
    config = _mkdocs_config()
    assert config["theme"].get("font") is False, "web fonts would be fetched from Google"
    assert not config.get("extra_javascript"), "the site must not load scripts from elsewhere"
    assert not config.get("extra_css")


@pytest.mark.slow
@pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings_handlers")
    ),
    reason="needs the [docs] extra (mkdocs, mkdocs-material, mkdocstrings[python])",
)
def test_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    html = (tmp_path / "site" / "losses" / "mdl" / "index.html").read_text(encoding="utf-8")
    assert "MarginDiscriminateLoss" in html
    assert 'class="arithmatex"' in html
    assert not re.search(r'<script[^>]+src="https?://', html), "a script is loaded from the network"
