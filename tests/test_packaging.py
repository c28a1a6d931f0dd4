"""Packaging: one version everywhere, the licence, py.typed, the extras, and a wheel that holds them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mbdl

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]


def test_version_is_one_and_the_same() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([abrc.]+\d+|\.dev\d+)?", mbdl.__version__)
    assert importlib.metadata.version("mbdl") == mbdl.__version__, (
        "the installed metadata is stale: reinstall with pip install -e ."
    )
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mbdl.__version__"}


def test_version_flag_prints_the_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mbdl", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mbdl {mbdl.__version__}"


def test_changelog_has_the_current_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{mbdl.__version__}]" in changelog


def test_license_is_mit_and_declared() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    # PEP 639: a licence expression replaces the licence classifiers
    assert not any(c.startswith("License ::") for c in PROJECT.get("classifiers", []))


def test_package_is_typed() -> None:
    assert (ROOT / "src" / "mbdl" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["mbdl"]
    assert "Typing :: Typed" in PROJECT["classifiers"]


def test_extras() -> None:
    extras = PROJECT["optional-dependencies"]
    names = {
        extra: {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in reqs}
        for extra, reqs in extras.items()
    }
    assert {"faiss-cpu"} <= names["faiss"]
    assert {"pytest", "ruff", "mypy", "build"} <= names["dev"]
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= names["docs"]
    assert any(req.startswith("mkdocstrings[python]") for req in extras["docs"])


def test_metadata_has_no_placeholders() -> None:
    for field in ("description", "readme", "requires-python"):
        assert PROJECT.get(field), field
    assert PROJECT["classifiers"] and PROJECT["keywords"]
    for url in PROJECT.get("urls", {}).values():
        assert not re.search(r"example\.(com|org)|TODO|your[-_]?(name|org)|<", url), url


@pytest.mark.skipif(
    importlib.util.find_spec("build") is None, reason="needs the build package ([dev] extra)"
)
def test_wheel_contents(tmp_path: Path) -> None:
    # build from a copy so that no build/ folder is left in the working tree
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (source / "dist").glob("mbdl-*.whl")
    assert wheel.name.startswith(f"mbdl-{mbdl.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"mbdl-{mbdl.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {"mbdl/__init__.py", "mbdl/py.typed", "mbdl/cli.py", f"{info}/licenses/LICENSE"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    assert f"Version: {mbdl.__version__}" in metadata
    assert "License-Expression: MIT" in metadata
    for extra in ("faiss", "dev", "docs"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "mbdl = mbdl.cli:main" in entry_points
