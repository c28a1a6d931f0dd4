"""An image folder: ``root/<class name>/<images>`` (any depth below the class folder).

The class-disjoint split is either

- by sorted class name: the last ``test_fraction`` of the classes (default half, at least one,
  and at least one left for training) are the test classes; or
- by a split file (``split_file=PATH``, or ``root/split.txt`` when it exists): one line per class,
  ``<class name> <train|val|test>`` (whitespace or a comma between; ``#`` starts a comment). Every
  class folder must be listed. When any class is marked ``val`` those are the validation classes;
  otherwise validation classes are carved from the training classes.

Files whose names end in :data:`mbdl.data.files.IMAGE_EXTENSIONS` (any case) are images; hidden
files and folders are ignored.

A class folder is one class, and a file is counted once:

- symbolic links (to files and to folders) are followed, a folder reached twice (a link loop)
  is walked once;
- a file reached twice within one class (a link, or a linked folder) is counted once; the
  others are reported in ``info["duplicates"]``;
- a file reached from two classes is refused (its label would be two things, and it would sit in
  two splits);
- a file or class folder whose resolved path lies outside ``root`` is refused unless
  ``allow_outside_root=True`` (``data.allow_outside_root``).

So train, validation and test never share a file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from mbdl.data.base import Splits
from mbdl.data.files import IMAGE_EXTENSIONS, class_disjoint_splits, file_dataset
from mbdl.errors import UserError, terminal_safe

SPLIT_FILE = "split.txt"
_SPLIT_LINE = re.compile(r"^(?P<name>.+?)[\s,]+(?P<split>train|val|test)$")


def scan_folder(
    root: Path, *, allow_outside_root: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """``(relative image paths, class names, duplicates)`` of every image below
    ``root/<class>/``, sorted, by the rules of the module docstring; ``duplicates`` lists the
    paths counted once already (``"path (same file as other)"``)."""
    real_root = Path(os.path.realpath(root))
    paths: list[str] = []
    classes: list[str] = []
    duplicates: list[str] = []
    owner: dict[str, tuple[str, str]] = {}  # resolved file -> (class, relative path)

    def check_inside(path: str, real: str) -> None:
        if not allow_outside_root and not Path(real).is_relative_to(real_root):
            raise UserError(
                f"{terminal_safe(path)} resolves to {terminal_safe(real)}, outside the data root "
                f"{terminal_safe(real_root)}; copy it into the root, or set "
                "data.allow_outside_root=true"
            )

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for class_dir in class_dirs:
        check_inside(str(class_dir), os.path.realpath(class_dir))
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            if real_dir in visited:  # a link loop, or a folder linked twice
                dirnames[:] = []
                continue
            visited.add(real_dir)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                full = os.path.join(dirpath, filename)
                relative = os.path.relpath(full, root)
                real = os.path.realpath(full)
                check_inside(full, real)
                if real in owner:
                    first_class, first = owner[real]
                    if first_class != class_dir.name:
                        raise UserError(
                            f"{terminal_safe(relative)} (class {terminal_safe(class_dir.name)!r}) "
                            f"and {terminal_safe(first)} (class {terminal_safe(first_class)!r}) "
                            "are the same file; a file belongs to one class: remove one of them"
                        )
                    duplicates.append(f"{relative} (same file as {first})")
                    continue
                owner[real] = (class_dir.name, relative)
                paths.append(relative)
                classes.append(class_dir.name)
    return paths, classes, duplicates


def read_split_file(path: Path) -> dict[str, str]:
    """``class name -> train|val|test`` from a split file."""
    assignment: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _SPLIT_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected '<class> train|val|test', got {raw!r}")
        name = match["name"].strip().strip(",")
        if name in assignment:
            raise ValueError(f"{path}:{number}: class {name!r} is listed twice")
        assignment[name] = match["split"]
    return assignment


def load_splits(
    root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    val_fraction: float = 0.15,
    seed: int = 0,
    test_fraction: float = 0.5,
    split_file: str | os.PathLike[str] | None = None,
    channels: int = 3,
    skip_corrupt: bool = False,
    allow_outside_root: bool = False,
) -> Splits:
    """The class-disjoint splits of an image folder (see the module docstring)."""
    if root is None:
        raise ValueError("data source 'folder' needs data.root (a folder of class folders)")
    base = Path(os.path.expanduser(str(root)))
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    paths, classes, duplicates = scan_folder(base, allow_outside_root=allow_outside_root)
    if duplicates:
        warnings.warn(
            f"counted {len(duplicates)} file(s) reached twice in a class once, first: "
            f"{terminal_safe(duplicates[0])}",
            stacklevel=2,
        )
    names = sorted(set(classes))
    if len(names) < 2:
        raise ValueError(f"{base} needs at least 2 class folders with images, found {len(names)}")
    split_path = Path(split_file) if split_file is not None else base / SPLIT_FILE
    if split_file is not None and not split_path.is_file():
        raise FileNotFoundError(f"split file not found: {split_path}")
    val_classes: list[str] | None = None
    if split_path.is_file():
        assignment = read_split_file(split_path)
        unlisted = [n for n in names if n not in assignment]
        unknown = [n for n in assignment if n not in set(names)]
        if unlisted or unknown:
            problem = f"class folders {unlisted[:5]} are not listed" if unlisted else ""
            problem += (
                f"{'; ' if problem else ''}classes {unknown[:5]} have no folder" if unknown else ""
            )
            raise ValueError(f"{split_path}: {problem}")
        train_classes = [n for n in names if assignment[n] == "train"]
        test_classes = [n for n in names if assignment[n] == "test"]
        listed_val = [n for n in names if assignment[n] == "val"]
        val_classes = listed_val or None
        how = f"split file {split_path}"
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        num_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
        train_classes, test_classes = names[:-num_test], names[-num_test:]
        how = f"last {num_test} of {len(names)} sorted class names for test"
    dataset = file_dataset(
        paths, classes, root=base, skip_corrupt=skip_corrupt, mode="L" if channels == 1 else "RGB"
    )
    return class_disjoint_splits(
        dataset,
        train_classes,
        test_classes,
        val_classes=val_classes,
        source="folder",
        image_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        info={"root": str(base), "split": how, "duplicates": duplicates},
    )
