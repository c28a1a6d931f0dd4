"""mkdocs hook: regenerate the reference pages (configuration.md, cli.md) before every build.

The generator is scripts/gen_docs.py; it rewrites a page only when its content changed, so
``mkdocs serve`` does not rebuild in a loop.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_docs.py"


def on_pre_build(config: Any, **kwargs: Any) -> None:
    spec = importlib.util.spec_from_file_location("mbdl_gen_docs", _SCRIPT)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(Path(config["docs_dir"]))
