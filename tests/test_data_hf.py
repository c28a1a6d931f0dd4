"""``data.source=hf``: a Hugging Face dataset saved to disk or as parquet files, class-disjoint
splits, named columns, bad input refused in one line before training."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbdl.cli import main
from mbdl.data import load_splits

datasets = pytest.importorskip("datasets")

CLASSES = 8
PER_CLASS = 4


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_table(
    image_column: str = "image", label_column: str = "label", broken: dict[int, bytes] | None = None
) -> object:
    """``CLASSES`` x ``PER_CLASS`` random PNGs; ``broken`` replaces some rows' bytes."""
    rows = [(c, k) for c in range(CLASSES) for k in range(PER_CLASS)]
    features = datasets.Features(
        {
            image_column: datasets.Image(),
            label_column: datasets.ClassLabel(names=[f"kind_{c}" for c in range(CLASSES)]),
        }
    )
    return datasets.Dataset.from_dict(
        {
            image_column: [
                {"bytes": (broken or {}).get(i, _png(100 * c + k)), "path": None}
                for i, (c, k) in enumerate(rows)
            ],
            label_column: [c for c, _ in rows],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf") / "saved"
    make_table().save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_parquet") / "parquet"
    root.mkdir()
    make_table("picture", "kind").to_parquet(str(root / "part-0.parquet"))
    return root


def test_saved_dataset_gives_class_disjoint_splits(saved: Path) -> None:
    splits = load_splits("hf", saved, image_size=16, val_fraction=0.25, seed=0)
    names = [set(getattr(splits, s).class_names) for s in ("train", "val", "test")]
    assert names[0].isdisjoint(names[1]) and names[0].isdisjoint(names[2])
    assert names[1].isdisjoint(names[2])
    assert set().union(*names) == {f"kind_{c}" for c in range(CLASSES)}
    assert len(splits.train) + len(splits.val) + len(splits.test) == CLASSES * PER_CLASS
    image, label = splits.test[0]
    assert tuple(image.shape) == (3, 16, 16) and 0 <= label < len(splits.test.class_names)
    # the decoded image is the stored one
    original = Image.open(io.BytesIO(_png(100 * (CLASSES // 2) + 0)))
    assert np.array_equal(np.asarray(splits.test.load_image(0)), np.asarray(original))


def test_parquet_files_with_named_columns(parquet: Path) -> None:
    splits = load_splits("hf", parquet, image_size=16, image_column="picture", label_column="kind")
    assert len(splits.test) == CLASSES // 2 * PER_CLASS


def test_training_on_a_saved_dataset(saved: Path, tmp_path: Path) -> None:
    args = [
        "data.source=hf",
        f"data.root={saved}",
        "data.image_size=16",
        "data.val_fraction=0",
        "model.embedding_dim=8",
        "train.epochs=1",
        "train.batch_classes=2",
        "train.batch_per_class=2",
        "train.max_steps_per_epoch=1",
        "train.device=cpu",
        "train.progress=false",
        "eval.ks=[1]",
        "eval.report=false",
        f"out={tmp_path / 'run'}",
    ]
    assert main(["train", *args]) == 0


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "has no column 'image'"),
        (["data.image_column=picture", "data.label_column=label"], "has no column 'label'"),
    ],
)
def test_missing_columns_are_one_line_before_training(
    parquet: Path,
    keys: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        ["train", "data.source=hf", f"data.root={parquet}", *keys, f"out={tmp_path / 'run'}"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_not_a_dataset_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train", "data.source=hf", f"data.root={tmp_path / 'empty'}"]) == 2
    assert "neither a dataset saved with save_to_disk nor .parquet" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"PAR1 truncated")
    assert main(["train", "data.source=hf", f"data.root={tmp_path / 'bad'}"]) == 2
    assert "cannot read the parquet files" in capsys.readouterr().err


# -- mbdl scan, and every row checked up front ----------------------------------------------

SCAN = ["data.val_fraction=0", "train.batch_classes=2", "eval.ks=[1]"]


def _scan(root: Path, *keys: str) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["scan", "data.source=hf", f"data.root={root}", *SCAN, *keys])
    return code, out.getvalue().splitlines(), err.getvalue()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The saved table with row 5 not an image and row 30 a truncated PNG."""
    root = tmp_path_factory.mktemp("hf_damaged") / "saved"
    make_table(broken={5: b"not an image", 30: _png(7)[:60]}).save_to_disk(str(root))
    return root


def test_scan_of_a_saved_dataset_counts_like_a_folder(saved: Path) -> None:
    code, lines, err = _scan(saved, "--per-class")
    assert code == 0, err
    assert lines[0].startswith("data hf: train 16 images / 4 classes, 4-4 per class, ")
    assert "test 16 images / 4 classes" in lines[0] and "unreadable" not in lines[0]
    per_class = [line.split() for line in lines[1:]]
    assert sorted(p[2] for p in per_class) == sorted(f"kind_{c}" for c in range(CLASSES))
    assert all(p[1] == str(PER_CLASS) for p in per_class)


def test_scan_of_parquet_files_with_named_columns(parquet: Path) -> None:
    code, lines, err = _scan(parquet, "data.image_column=picture", "data.label_column=kind")
    assert code == 0, err
    assert lines[0].startswith("data hf: train 16 images / 4 classes")


def test_scan_names_every_unreadable_row_and_refuses(damaged: Path) -> None:
    code, lines, err = _scan(damaged)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "2 image(s) cannot be used (listed above)" in err
    unreadable = [line for line in lines if "unreadable: " in line]
    assert [line.split("unreadable: ")[1].split(" ")[0] for line in unreadable] == [
        f"{damaged}[5]",
        f"{damaged}[30]",
    ]
    assert unreadable[0].endswith("[5] (cannot identify image file)")  # no object address
    assert "skipped 2 unreadable" in lines[0]
    assert lines[0].startswith("data hf: train 15 images / 4 classes, 3-4 per class")
    code, lines, err = _scan(damaged, "data.skip_corrupt=true")
    assert code == 0, err


def test_unreadable_rows_are_refused_before_training_or_skipped(
    damaged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "data.source=hf", f"data.root={damaged}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"image cannot be read: {damaged}[5]" in err and "2 of 32 rows" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        splits = load_splits("hf", damaged, image_size=16, val_fraction=0, skip_corrupt=True)
    assert len(splits.train) + len(splits.test) == CLASSES * PER_CLASS - 2
    # every kept row decodes, and is named by its row in the files
    described = {splits.test.describe(i) for i in range(len(splits.test))}
    described |= {splits.train.describe(i) for i in range(len(splits.train))}
    assert f"{damaged}[5]" not in described and f"{damaged}[31]" in described
    for split in (splits.train, splits.test):
        for i in range(len(split)):
            split.load_image(i)


def _write(tmp_path: Path, columns: dict[str, list[object]], features: object = None) -> Path:
    root = tmp_path / "table"
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(root))
    return root


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("float labels", "column 'label' holds float64 values; class labels must be integers"),
        ("a missing label", "[3]: column 'label' holds no class label (None)"),
        ("image paths as strings", "column 'image' holds string values, not images"),
    ],
)
def test_columns_of_the_wrong_kind_are_one_line(case: str, message: str, tmp_path: Path) -> None:
    images: list[object] = [_png(i) for i in range(8)]
    labels: list[object] = [i % 2 for i in range(8)]
    if case == "float labels":
        labels = [float(v) + 0.5 for v in labels]
    elif case == "a missing label":
        labels[3] = None
    else:
        images = [f"/images/{i}.png" for i in range(8)]
    root = _write(tmp_path, {"image": images, "label": labels})
    code, _, err = _scan(root)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
