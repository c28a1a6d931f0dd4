"""``data.source=hf``: a Hugging Face dataset saved to disk or as parquet files, class-disjoint
splits, named columns, bad input refused in one line before training."""

from __future__ import annotations

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


def make_table(image_column: str = "image", label_column: str = "label") -> object:
    rows = [(c, k) for c in range(CLASSES) for k in range(PER_CLASS)]
    features = datasets.Features(
        {
            image_column: datasets.Image(),
            label_column: datasets.ClassLabel(names=[f"kind_{c}" for c in range(CLASSES)]),
        }
    )
    return datasets.Dataset.from_dict(
        {
            image_column: [{"bytes": _png(100 * c + k), "path": None} for c, k in rows],
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
