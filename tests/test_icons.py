"""The icons data set builder (mbdl.data.builders.icons) on small icon themes written in the freedesktop
layout: families, aliases, generic fallbacks, symbolic icons, duplicates, corrupt files, the
fixed split, the manifest and the refusals."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cairosvg")

from mbdl.cli import main
from mbdl.data import load_splits
from mbdl.data.builders.icons import (
    GENERIC_PICTURE_NAMES,
    IconsError,
    build_icons,
    family_from_name,
    find_themes,
    is_test_class,
    read_theme_directories,
    render_icon,
)

NAMES = [f"icon-{i:02d}" for i in range(12)]


def _svg(family: int, name: int, size: int = 48) -> str:
    """A drawing unique to (family, name): a shape whose position codes the name, whose colour
    codes the family."""
    x, y = 4 + (name % 4) * 10, 4 + (name // 4) * 10
    colour = f"#{(40 * family) % 256:02x}{(90 * name) % 256:02x}{(150 + 7 * family) % 256:02x}"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}">'
        f'<rect x="{x}" y="{y}" width="14" height="14" fill="{colour}"/>'
        f'<circle cx="{size - 8}" cy="{size - 8}" r="{2 + family}" fill="#000"/></svg>'
    )


def _theme(root: Path, name: str, files: dict[str, str], *, size: int = 48) -> Path:
    """A theme ``root/name`` with one fixed-size directory holding ``files`` (name -> SVG text,
    or ``"->target"`` for a symlink to another icon of the theme)."""
    theme = root / name
    folder = theme / f"{size}x{size}" / "actions"
    folder.mkdir(parents=True)
    (theme / "index.theme").write_text(
        "[Icon Theme]\n"
        f"Name={name}\nDirectories={size}x{size}/actions,scalable/actions\n\n"
        f"[{size}x{size}/actions]\nSize={size}\nContext=Actions\nType=Fixed\n\n"
        "[scalable/actions]\nSize=16\nMaxSize=512\nContext=Actions\nType=Scalable\n",
        encoding="utf-8",
    )
    for icon, content in files.items():
        path = folder / f"{icon}.svg"
        if content.startswith("->"):
            path.symlink_to(f"{content[2:]}.svg")
        else:
            path.write_text(content, encoding="utf-8")
    return theme


def _themes(root: Path, families: int = 5) -> Path:
    for f in range(families):
        _theme(root, f"Artist{f}", {n: _svg(f, i) for i, n in enumerate(NAMES)})
    return root


def _png_pixels(path: Path) -> bytes:
    return np.asarray(Image.open(path).convert("RGB")).tobytes()


def test_theme_directories_follow_the_spec(tmp_path: Path) -> None:
    theme = _theme(tmp_path, "T", {"a": _svg(0, 0)})
    directories = dict(read_theme_directories(theme / "index.theme"))
    assert directories == {"48x48/actions": 48.0, "scalable/actions": 512.0}


def test_family_from_name_merges_variants() -> None:
    assert family_from_name("breeze-dark") == family_from_name("breeze") == "breeze"
    assert family_from_name("Numix-Light") == "numix"
    assert family_from_name("elementary-xfce-darkest") == "elementary-xfce"
    assert family_from_name("Faenza-Ambiance") == "faenza"


def test_builds_one_folder_per_class_with_a_fixed_split(tmp_path: Path) -> None:
    themes = _themes(tmp_path / "themes", families=5)
    out = tmp_path / "icons"
    manifest = build_icons(out, themes_dir=themes, size=32, min_families=4, workers=1)
    assert manifest["counts"]["classes"] == len(NAMES)
    assert manifest["counts"]["images"] == 5 * len(NAMES)
    for name in NAMES:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == [f"artist{f}.png" for f in range(5)]
        assert Image.open(out / name / files[0]).size == (32, 32)
    lines = (out / "split.txt").read_text(encoding="utf-8").split()
    assignment = dict(zip(lines[::2], lines[1::2], strict=True))
    assert assignment == {n: "test" if is_test_class(n, 0.5) else "train" for n in NAMES}
    assert json.loads((out / "manifest.json").read_text())["classes"][NAMES[0]]["families"]
    splits = load_splits("folder", out, image_size=32, val_fraction=0.0)
    train_names = {splits.train.class_names[i] for i in set(splits.train.labels)}
    test_names = {splits.test.class_names[i] for i in set(splits.test.labels)}
    assert train_names.isdisjoint(test_names)
    assert test_names == {n for n in NAMES if is_test_class(n, 0.5)}


def test_split_of_a_class_does_not_depend_on_the_others() -> None:
    digest = hashlib.sha256(b"document-save").hexdigest()
    assert is_test_class("document-save", 0.5) == (int(digest[:8], 16) / 2**32 < 0.5)
    shares = [is_test_class(f"name-{i}", 0.5) for i in range(2000)]
    assert 0.45 < float(np.mean(shares)) < 0.55


def test_variants_of_a_family_give_one_drawing(tmp_path: Path) -> None:
    themes = _themes(tmp_path / "themes", families=4)
    # a dark variant of Artist0 with its own drawings and more files: same family, so no fifth
    # instance, and the main theme's drawings are preferred (dark variants draw for dark panels)
    dark = {n: _svg(9, i) for i, n in enumerate(NAMES)} | {"dark-only": _svg(9, 20)}
    _theme(themes, "Artist0-Dark", dark)
    out = tmp_path / "out"
    manifest = build_icons(out, themes_dir=themes, size=32, workers=1)
    assert sorted(manifest["families"]) == [f"artist{f}" for f in range(4)]
    assert manifest["families"]["artist0"] == ["Artist0", "Artist0-Dark"]
    assert manifest["counts"]["images"] == 4 * len(NAMES)
    main_drawing = render_icon(themes / "Artist0" / "48x48" / "actions" / "icon-00.svg", 32)
    assert _png_pixels(out / "icon-00" / "artist0.png") == main_drawing.tobytes()


def test_aliases_are_one_class_and_generic_fallbacks_link_nothing(tmp_path: Path) -> None:
    root = tmp_path / "themes"
    generic = [f"mime-{i}" for i in range(GENERIC_PICTURE_NAMES + 1)]
    for f in range(4):
        files = {n: _svg(f, i) for i, n in enumerate(NAMES)}
        files["stock_icon-00"] = "->icon-00"  # legacy alias in every family: one class
        if f == 0:  # one theme's catch-all picture for many names
            files.update({g: "->icon-01" for g in generic})
        _theme(root, f"Artist{f}", files)
    out = tmp_path / "out"
    manifest = build_icons(out, themes_dir=root, size=32, workers=1)
    assert "stock_icon-00" not in manifest["classes"]
    assert manifest["classes"]["icon-00"]["aliases"] == ["stock_icon-00"]
    assert not (out / "stock_icon-00").exists()
    assert manifest["classes"]["icon-01"]["aliases"] == []
    assert manifest["counts"]["classes"] == len(NAMES)
    every_image = [p for p in out.rglob("*.png")]
    pixels = [_png_pixels(p) for p in every_image]
    assert len(set(pixels)) == len(pixels)  # no picture in two places


def test_an_alias_seen_by_too_few_families_does_not_merge_but_shares_no_picture(
    tmp_path: Path,
) -> None:
    root = tmp_path / "themes"
    for f in range(4):
        files = {n: _svg(f, i) for i, n in enumerate(NAMES)}
        # one family draws icon-11 with icon-10's picture: not an alias (one family), and the
        # picture goes to one class only
        if f == 0:
            files["icon-11"] = "->icon-10"
        _theme(root, f"Artist{f}", files)
    manifest = build_icons(tmp_path / "out", themes_dir=root, size=32, workers=1)
    assert "icon-11" not in manifest["classes"]  # 3 families left: below min_families
    assert manifest["classes"]["icon-10"]["families"] == [f"artist{f}" for f in range(4)]


def test_symbolic_icons_are_skipped_and_identical_renderings_dropped(tmp_path: Path) -> None:
    root = tmp_path / "themes"
    for f in range(5):
        files = {n: _svg(f, i) for i, n in enumerate(NAMES)}
        files["icon-00-symbolic"] = _svg(f, 0)
        if f == 4:
            files["icon-03"] = _svg(3, 3)  # copies family 3's drawing byte for byte
        _theme(root, f"Artist{f}", files)
    out = tmp_path / "out"
    manifest = build_icons(out, themes_dir=root, size=32, workers=1)
    assert "icon-00-symbolic" not in manifest["classes"]
    assert len(manifest["classes"]["icon-03"]["families"]) == 4
    assert manifest["counts"]["duplicate_renderings_dropped"] >= 1


def test_a_corrupt_svg_is_named_and_left_out(tmp_path: Path) -> None:
    root = tmp_path / "themes"
    for f in range(5):
        files = {n: _svg(f, i) for i, n in enumerate(NAMES)}
        if f == 2:
            files["icon-05"] = "<svg this is not xml"
        _theme(root, f"Artist{f}", files)
    manifest = build_icons(tmp_path / "out", themes_dir=root, size=32, workers=1)
    assert len(manifest["skipped"]) == 1
    assert "Artist2" in manifest["skipped"][0] and "icon-05.svg" in manifest["skipped"][0]
    assert "artist2" not in manifest["classes"]["icon-05"]["families"]
    with pytest.raises(ValueError, match="cannot render"):
        render_icon(root / "Artist2" / "48x48" / "actions" / "icon-05.svg", 32)


def test_raster_icons_are_fitted_on_white(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGBA", (40, 20), (255, 0, 0, 255)).save(path)
    pixels = render_icon(path, 32)
    assert pixels.shape == (32, 32, 3)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # letterbox: background
    assert tuple(pixels[16, 16]) == (255, 0, 0)


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(IconsError, match="apt-get install"):
        build_icons(tmp_path / "o1", themes_dir=tmp_path / "missing")
    few = _themes(tmp_path / "few", families=3)
    with pytest.raises(IconsError, match=r"found 3 icon theme families.*apt-get install"):
        build_icons(tmp_path / "o2", themes_dir=few, workers=1)
    assert not (tmp_path / "o2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o2")] == []
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(IconsError, match="not empty"):
        build_icons(busy, themes_dir=_themes(tmp_path / "ok", families=4), workers=1)
    assert (busy / "keep.txt").read_text(encoding="utf-8") == "mine"
    code = main(["data", "icons", "--out", str(tmp_path / "o3"), "--themes-dir", str(few)])
    assert code == 2
    assert "need at least 4" in capsys.readouterr().err


def test_missing_renderer_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # import fails as if not installed
    with pytest.raises(IconsError, match=r"pip install 'mbdl\[icons\]'"):
        build_icons(tmp_path / "out", themes_dir=_themes(tmp_path / "themes", families=4))
    assert not (tmp_path / "out").exists()


def test_cli_builds_and_describes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    themes = _themes(tmp_path / "themes", families=4)
    out = tmp_path / "icons"
    args = ["data", "icons", "--out", str(out), "--themes-dir", str(themes), "--size", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{len(NAMES)} classes" in printed and "data.source=folder" in printed


@pytest.mark.skipif(not os.path.isdir("/usr/share/icons/Adwaita"), reason="no icon themes")
def test_installed_themes_are_found() -> None:
    themes = find_themes("/usr/share/icons")
    assert all(t.family for t in themes)
    assert all(t.name not in ("hicolor", "default") for t in themes)
