"""``icons``: a real multi-artist retrieval set built from the freedesktop icon themes on disk.

A class is an icon name (``document-save``, ``folder-music``, ``battery-low``, ...); an instance
is one theme *family*'s drawing of it. Debian ships dozens of icon themes drawn by different
artists (``apt-get install --no-install-recommends adwaita-icon-theme breeze-icon-theme ...``:
:data:`SUGGESTED_PACKAGES`), so the same concept appears in many styles: a retrieval task of
the kind deep metric learning is for, built offline and never redistributed.

How :func:`build_icons` (``mbdl data icons``) turns ``/usr/share/icons`` into an image folder:

1. **Themes and families.** Every folder with an ``index.theme`` is a theme (``hicolor``,
   ``locolor`` and ``default``, the generic fallbacks, are skipped). Themes shipped by one Debian
   package are variants of one family (breeze / breeze-dark, Papirus / Papirus-Dark /
   ePapirus...); without dpkg, the family is the theme name with variant words (``dark``,
   ``light``, ...) removed. Within a family, a theme whose name has no variant word comes first
   (dark variants draw light shapes meant for dark panels), then themes with more icon files.
2. **One file per name and theme**, at the largest size the theme's ``index.theme`` declares
   (scalable directories count at their ``MaxSize``; ``Scale`` multiplies); SVG, PNG and XPM
   files. Names ending in ``-symbolic`` (monochrome) are skipped.
3. **Aliases are one class.** A *picture* is a file's content (symlinks resolved, identical
   bytes are one picture). Two names are aliases when at least :data:`ALIAS_MIN_FAMILIES`
   families draw both with one shared picture (the artists agree: ``edit-find`` / ``gtk-find`` /
   ``stock_search``); linked names form one class (union-find), named after its member drawn by
   the most families (then the shortest, then alphabetical). A picture shared by more than
   :data:`GENERIC_PICTURE_NAMES` names is a theme's generic fallback and links nothing, so
   classes never snowball through one theme's catch-all file.
4. **One picture, one class; one drawing per family and class.** A picture used under names of
   several classes belongs to the class drawn by the most families alone. A family contributes
   its file for the class name, else for the member drawn by the most families, among the
   pictures the class owns.
5. **Rendering**: SVG with CairoSVG, raster with Pillow, fitted into ``size x size`` (aspect
   kept, centred) and composited onto a white background; RGB PNG output. A file that does not
   render is named in the manifest's ``skipped`` list and left out.
6. **Duplicates**: a rendering with the same pixels as one already kept (classes drawn by more
   families first) is dropped, so no two images of the data set are identical. Classes drawn by
   fewer than ``min_families`` families are dropped.
7. **Split**: fixed and class-disjoint: a class is a test class when the first 8 hex digits of
   the SHA-256 of its name, read as a fraction of 2**32, are below ``test_fraction``; the rest
   train (validation classes are carved from them by the trainer's ``data.val_fraction``). The
   assignment of a class never depends on which other classes exist.

Output: ``OUT/<class>/<family>.png``, ``OUT/split.txt`` (read by ``data.source=folder``) and
``OUT/manifest.json`` (packages with versions and licences, families and their themes, counts,
skipped files, build parameters). The folder is written under a temporary name and renamed when
complete, so a failed build never leaves a half-written data set.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: bump when the selection or rendering rules change
ICONS_VERSION = 1

#: Debian packages of icon themes by different artists (each one family)
SUGGESTED_PACKAGES = (
    "adwaita-icon-theme",
    "breeze-icon-theme",
    "oxygen-icon-theme",
    "tango-icon-theme",
    "gnome-icon-theme",
    "elementary-xfce-icon-theme",
    "numix-icon-theme",
    "mate-icon-theme",
    "lxde-icon-theme",
    "faba-icon-theme",
    "moka-icon-theme",
    "suru-icon-theme",
    "papirus-icon-theme",
    "paper-icon-theme",
    "faenza-icon-theme",
    "deepin-icon-theme",
)
INSTALL_HINT = "install icon themes with: apt-get install --no-install-recommends " + " ".join(
    SUGGESTED_PACKAGES
)

#: generic fallback themes that hold whatever applications installed, not an artist's set
GENERIC_THEMES = frozenset({"hicolor", "locolor", "default"})
#: words that mark a variant of a family in a theme's name (used without dpkg)
VARIANT_WORDS = frozenset(
    {"dark", "darker", "darkest", "light", "mono", "ambiance", "radiance", "classic", "legacy"}
)
ICON_SUFFIXES = (".svg", ".png", ".xpm")
BACKGROUND = (255, 255, 255)
#: names are aliases when this many families draw them with one shared picture
ALIAS_MIN_FAMILIES = 3
#: a picture shared by more names than this is a generic fallback, not an alias
GENERIC_PICTURE_NAMES = 8


class IconsError(ValueError):
    """The icon themes cannot make a data set (none installed, too few families, bad output)."""


@dataclass
class Theme:
    """One icon theme folder: its name, family, and per icon name the largest file."""

    name: str
    path: Path
    family: str = ""
    package: str | None = None
    files: dict[str, tuple[float, Path]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# themes


def read_theme_directories(index_file: Path) -> list[tuple[str, float]]:
    """``(directory, effective size)`` of every directory an ``index.theme`` declares.

    The effective size is ``Size`` (``MaxSize`` for ``Type=Scalable``, when given) times
    ``Scale``: the freedesktop icon theme specification's keys."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(index_file.read_text(encoding="utf-8", errors="replace"))
    except configparser.Error as error:
        raise IconsError(f"{index_file}: not a valid index.theme ({error})") from None
    if not parser.has_section("Icon Theme"):
        return []
    listed: list[str] = []
    for key in ("Directories", "ScaledDirectories"):
        listed += [d.strip() for d in parser.get("Icon Theme", key, fallback="").split(",")]
    directories = []
    for directory in dict.fromkeys(d for d in listed if d):
        if not parser.has_section(directory):
            continue
        section = parser[directory]
        try:
            size = float(section.get("Size", "0"))
            if section.get("Type", "Threshold") == "Scalable":
                size = float(section.get("MaxSize", size))
            size *= float(section.get("Scale", "1"))
        except ValueError:
            continue
        directories.append((directory, size))
    return directories


def scan_theme(path: Path) -> dict[str, tuple[float, Path]]:
    """Icon name -> ``(effective size, file)`` of its largest non-symbolic file in theme ``path``
    (SVG preferred over raster files at equal size)."""
    best: dict[str, tuple[float, Path]] = {}
    for directory, size in read_theme_directories(path / "index.theme"):
        folder = path / directory
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() not in ICON_SUFFIXES or stem.endswith("-symbolic"):
                continue
            if not os.path.isfile(entry.path):  # dangling symlink
                continue
            rank = size + (0.5 if suffix.lower() == ".svg" else 0.0)
            if stem not in best or rank > best[stem][0]:
                best[stem] = (rank, Path(entry.path))
    return best


def owning_packages(index_files: Sequence[Path]) -> dict[Path, str]:
    """The Debian package of each ``index.theme`` file, where dpkg knows it (else absent)."""
    if not index_files or shutil.which("dpkg-query") is None:
        return {}
    result = subprocess.run(
        ["dpkg-query", "-S", *map(str, index_files)],
        capture_output=True,
        text=True,
        check=False,
    )
    owners: dict[Path, str] = {}
    for line in result.stdout.splitlines():
        package, sep, file = line.partition(": ")
        if sep and "," not in package:
            owners[Path(file.strip())] = package.split(":")[0].strip()
    return owners


def is_variant(theme: str) -> bool:
    """Whether a theme's name marks it as a variant (``breeze-dark``, ``Numix-Light``): its
    drawings are a family's second choice (dark variants draw light shapes for dark panels)."""
    return any(w in VARIANT_WORDS for w in re.split(r"[-_ ]+", theme.lower()))


def family_from_name(theme: str) -> str:
    """A family name from a theme name alone: lower case, variant words and a leading ``e``
    (ePapirus) removed: ``breeze-dark`` -> ``breeze``, ``Numix-Light`` -> ``numix``."""
    words = [w for w in re.split(r"[-_ ]+", theme.lower()) if w and w not in VARIANT_WORDS]
    stem = "-".join(words) or theme.lower()
    return stem


def find_themes(themes_dir: str | os.PathLike[str]) -> list[Theme]:
    """Every non-generic theme under ``themes_dir`` with its family (see the module docstring)."""
    base = Path(themes_dir)
    if not base.is_dir():
        raise IconsError(f"icon themes folder not found: {base}; {INSTALL_HINT}")
    paths = sorted(
        p
        for p in base.iterdir()
        if p.is_dir() and p.name not in GENERIC_THEMES and (p / "index.theme").is_file()
    )
    owners = owning_packages([p / "index.theme" for p in paths])
    themes = []
    for path in paths:
        package = owners.get(path / "index.theme") or owners.get((path / "index.theme").resolve())
        theme = Theme(path.name, path, package=package)
        theme.files = scan_theme(path)
        if not theme.files:
            continue
        theme.family = package or family_from_name(path.name)
        themes.append(theme)
    # ePapirus and Papirus are one family also without dpkg: merge "e" + an existing family
    families = {t.family for t in themes}
    for theme in themes:
        if theme.package is None and theme.family.startswith("e") and theme.family[1:] in families:
            theme.family = theme.family[1:]
    return themes


# ---------------------------------------------------------------------------------------------
# classes


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = defaultdict(list)
        for item in self.parent:
            members[self.find(item)].append(item)
        return members


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def family_files(themes: Sequence[Theme]) -> dict[str, dict[str, Path]]:
    """Family -> icon name -> file, each name taken from the family's preferred theme that has it
    (themes with more icon files first)."""
    by_family: dict[str, list[Theme]] = defaultdict(list)
    for theme in themes:
        by_family[theme.family].append(theme)
    result: dict[str, dict[str, Path]] = {}
    for family, members in sorted(by_family.items()):
        members.sort(key=lambda t: (is_variant(t.name), -len(t.files), t.name))
        files: dict[str, Path] = {}
        for theme in members:
            for name, (_, path) in theme.files.items():
                files.setdefault(name, path)
        result[family] = files
    return result


def alias_classes(
    files: dict[str, dict[str, Path]],
) -> tuple[dict[str, list[str]], dict[str, dict[str, Path]]]:
    """``(classes, drawings)``: class name -> member icon names, and class name -> family -> the
    file that family contributes (see steps 3 and 4 of the module docstring).

    A *picture* is a file's content (symlinks resolved; identical bytes are one picture). Names
    are aliases when at least :data:`ALIAS_MIN_FAMILIES` families draw them with one shared
    picture; a picture shared by more than :data:`GENERIC_PICTURE_NAMES` names is a generic
    fallback and links nothing. Every picture belongs to one class only: the one whose members
    are drawn by the most families (then the class name); other classes do not get it.
    """
    drawn_by: Counter[str] = Counter(name for names in files.values() for name in names)
    picture_of: dict[tuple[str, str], str] = {}
    digests: dict[str, str] = {}
    sharing: dict[str, list[tuple[str, str]]] = defaultdict(list)  # picture -> (family, name)
    for family, family_map in files.items():
        for name, path in family_map.items():
            target = os.path.realpath(path)
            if target not in digests:
                digests[target] = _file_digest(Path(target))
            picture_of[family, name] = digests[target]
            sharing[digests[target]].append((family, name))
    union = _UnionFind()
    for name in drawn_by:
        union.find(name)
    agreeing: dict[tuple[str, str], set[str]] = defaultdict(set)
    for entries in sharing.values():
        names = sorted({name for _, name in entries})
        if 1 < len(names) <= GENERIC_PICTURE_NAMES:
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    agreeing[a, b].update(family for family, _ in entries)
    for (a, b), families in agreeing.items():
        if len(families) >= ALIAS_MIN_FAMILIES:
            union.union(a, b)
    classes: dict[str, list[str]] = {}
    class_of: dict[str, str] = {}
    for members in union.groups().values():
        members.sort(key=lambda n: (-drawn_by[n], len(n), n))
        classes[members[0]] = members
        for member in members:
            class_of[member] = members[0]
    weight = {c: max(drawn_by[m] for m in members) for c, members in classes.items()}
    owner = {
        picture: min({class_of[n] for _, n in entries}, key=lambda c: (-weight[c], c))
        for picture, entries in sharing.items()
    }
    drawings: dict[str, dict[str, Path]] = {}
    for class_name, members in classes.items():
        chosen = {}
        for family, family_map in sorted(files.items()):
            for name in members:
                if name in family_map and owner[picture_of[family, name]] == class_name:
                    chosen[family] = family_map[name]
                    break
        drawings[class_name] = chosen
    return classes, drawings


def is_test_class(name: str, test_fraction: float) -> bool:
    """Whether class ``name`` is a test class (a fixed function of the name; module docstring)."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32 < test_fraction


# ---------------------------------------------------------------------------------------------
# rendering


def render_icon(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """``uint8[size, size, 3]``: the icon fitted into the square (aspect kept, centred) on a
    white background. Raises ``ValueError`` naming the file when it does not render."""
    file = Path(path)
    image: Image.Image
    try:
        if file.suffix.lower() == ".svg":
            import cairosvg

            png = cairosvg.svg2png(url=str(file), output_width=size)  # height: aspect kept
            image = Image.open(io.BytesIO(png))
        else:
            image = Image.open(file)
        image.load()
    except Exception as error:  # cairosvg and PIL raise many types for a bad file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"cannot render {file}: {reason}") from None
    image = image.convert("RGBA")
    if max(image.size) != size:
        scale = size / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (*BACKGROUND, 255))
    canvas.alpha_composite(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas.convert("RGB"))


def _render_job(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    path, size = job
    try:
        return render_icon(path, size), None
    except ValueError as error:
        return None, str(error)


def _render_all(paths: Sequence[Path], size: int, workers: int) -> list[tuple[Any, Any]]:
    jobs = [(str(p), size) for p in paths]
    if workers <= 1 or len(jobs) < 64:
        return [_render_job(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_render_job, jobs, chunksize=32))


# ---------------------------------------------------------------------------------------------
# manifest


def package_info(packages: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Version and licences (from ``/usr/share/doc/<package>/copyright``) of Debian packages."""
    info: dict[str, dict[str, Any]] = {}
    for package in sorted(set(packages)):
        version = None
        if shutil.which("dpkg-query") is not None:
            result = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package],
                capture_output=True,
                text=True,
                check=False,
            )
            version = result.stdout.strip() or None
        licences: list[str] = []
        copyright_file = Path("/usr/share/doc") / package / "copyright"
        if copyright_file.is_file():
            text = copyright_file.read_text(encoding="utf-8", errors="replace")
            found = re.findall(r"^License:\s*(\S.*)$", text, flags=re.MULTILINE)
            licences = sorted({" ".join(item.split()) for item in found})
        info[package] = {"version": version, "licences": licences}
    return info


# ---------------------------------------------------------------------------------------------
# the builder


def build_icons(
    out: str | os.PathLike[str],
    *,
    themes_dir: str | os.PathLike[str] = "/usr/share/icons",
    size: int = 128,
    min_families: int = 4,
    test_fraction: float = 0.5,
    workers: int | None = None,
) -> dict[str, Any]:
    """Build the icons data set into the new folder ``out``; returns the manifest.

    See the module docstring for every rule. Raises :class:`IconsError` when ``out`` exists and is
    not empty, or when fewer than ``min_families`` families are installed or yield a class.
    """
    if size < 16:
        raise IconsError(f"size must be >= 16 pixels, got {size}")
    if min_families < 2:
        raise IconsError(f"min_families must be >= 2, got {min_families}")
    if not 0.0 < test_fraction < 1.0:
        raise IconsError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        import cairosvg
    except ImportError:
        raise IconsError(
            "mbdl data icons needs CairoSVG to render the SVG icons: pip install 'mbdl[icons]'"
        ) from None
    target = Path(os.path.expanduser(str(out)))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise IconsError(f"{target} already exists and is not empty; choose another output folder")
    themes = find_themes(themes_dir)
    files = family_files(themes)
    if len(files) < min_families:
        found = ", ".join(sorted(files)) or "none"
        raise IconsError(
            f"found {len(files)} icon theme families in {themes_dir} ({found}); need at least "
            f"{min_families}: {INSTALL_HINT}"
        )
    classes, drawings = alias_classes(files)
    families = sorted(files)
    chosen = {c: d for c, d in drawings.items() if len(d) >= min_families}
    jobs = [(c, f, p) for c, by_family in sorted(chosen.items()) for f, p in by_family.items()]
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    rendered = _render_all([p for _, _, p in jobs], size, workers)
    skipped = [error for _, error in rendered if error is not None]

    # a rendering identical to one already kept (in this or a class drawn by more families) is
    # dropped: no two images of the data set have the same pixels
    weight = {c: len(d) for c, d in chosen.items()}
    order = sorted(range(len(jobs)), key=lambda i: (-weight[jobs[i][0]], jobs[i][0], i))
    kept: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    seen: set[str] = set()
    duplicates = 0
    for i in order:
        pixels = rendered[i][0]
        if pixels is None:
            continue
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        kept[jobs[i][0]][jobs[i][1]] = pixels

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        class_rows: dict[str, dict[str, Any]] = {}
        for class_name, by_family in sorted(kept.items()):
            if len(by_family) < min_families:
                continue
            folder = staging / class_name
            folder.mkdir()
            for family, pixels in sorted(by_family.items()):
                Image.fromarray(pixels).save(folder / f"{family}.png")
            split = "test" if is_test_class(class_name, test_fraction) else "train"
            class_rows[class_name] = {
                "split": split,
                "families": sorted(by_family),
                "aliases": classes[class_name][1:],
            }
        if len(class_rows) < 2:
            raise IconsError(
                f"only {len(class_rows)} icon names are drawn by at least {min_families} "
                f"families; {INSTALL_HINT}"
            )
        splits = Counter(row["split"] for row in class_rows.values())
        if not splits["train"] or not splits["test"]:
            raise IconsError("the split left no training or no test class; change test_fraction")
        lines = [f"{name} {row['split']}" for name, row in sorted(class_rows.items())]
        (staging / "split.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        packages = sorted({t.package for t in themes if t.package})
        manifest = {
            "icons_version": ICONS_VERSION,
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": {
                "themes_dir": str(themes_dir),
                "size": size,
                "min_families": min_families,
                "test_fraction": test_fraction,
                "background": list(BACKGROUND),
            },
            "renderer": {"cairosvg": cairosvg.__version__, "pillow": Image.__version__},
            "packages": package_info(packages),
            "families": {
                family: sorted(t.name for t in themes if t.family == family) for family in families
            },
            "counts": {
                "classes": len(class_rows),
                "images": sum(len(row["families"]) for row in class_rows.values()),
                "train_classes": splits["train"],
                "test_classes": splits["test"],
                "duplicate_renderings_dropped": duplicates,
                "skipped_files": len(skipped),
            },
            "skipped": skipped,
            "classes": class_rows,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", "utf-8")
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def describe_icons(manifest: dict[str, Any], out: str | os.PathLike[str]) -> str:
    """A few lines summarising a built icons data set."""
    counts = manifest["counts"]
    families = manifest["families"]
    lines = [
        f"icons data set in {out}",
        f"  {counts['classes']} classes ({counts['train_classes']} train, "
        f"{counts['test_classes']} test), {counts['images']} images of "
        f"{manifest['parameters']['size']} px from {len(families)} families",
        f"  families: {', '.join(families)}",
        f"  dropped {counts['duplicate_renderings_dropped']} duplicate renderings; "
        f"{counts['skipped_files']} files did not render (listed in manifest.json)",
        f"  train with: mbdl train data.source=folder data.root={out}",
    ]
    return "\n".join(lines)
