"""The generic sources (image folder, CSV list, IDX files) and FileImageDataset."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from fixtures_data import make_folder, make_idx, write_corrupt, write_idx, write_image
from mbdl.data import load_splits
from mbdl.data.files import FileImageDataset, ImageReadError
from mbdl.data.idx import read_idx

# -- image folder -------------------------------------------------------------------------------


def test_folder_split_by_sorted_class_name(tmp_path):
    make_folder(tmp_path, num_classes=6, per_class=3)
    splits = load_splits("folder", tmp_path, image_size=16, val_fraction=0.34, seed=0)
    assert splits.test.class_names == ["class_3", "class_4", "class_5"]
    assert sorted(splits.train.class_names + splits.val.class_names) == [
        "class_0",
        "class_1",
        "class_2",
    ]
    assert splits.val.num_classes == 1
    assert len(splits.test) == 9  # the hidden file and notes.txt are not images
    for i in range(len(splits.test)):
        path = splits.test.describe(i)
        assert path.split("/")[-2] == splits.test.class_names[splits.test.labels[i]]
    image, label = splits.test[4]
    assert image.shape == (3, 16, 16) and label == 1


def test_folder_test_fraction_and_grey(tmp_path):
    make_folder(tmp_path, num_classes=5, per_class=2)
    splits = load_splits(
        "folder", tmp_path, image_size=16, test_fraction=0.2, channels=1, val_fraction=0.0
    )
    assert splits.test.class_names == ["class_4"] and splits.train.num_classes == 4
    assert len(splits.val) == 0
    assert splits.channels == 1 and splits.train.load_image(0).mode == "L"
    assert splits.test[0][0].shape == (1, 16, 16)


def test_folder_split_file(tmp_path):
    make_folder(tmp_path, num_classes=5, per_class=2)
    (tmp_path / "split.txt").write_text(
        "# class -> split\nclass_0 test\nclass_1,train\nclass_2\ttrain\nclass_3 val\nclass_4 train\n"
    )
    splits = load_splits("folder", tmp_path, image_size=16)
    assert splits.test.class_names == ["class_0"]
    assert splits.val.class_names == ["class_3"]
    assert splits.train.class_names == ["class_1", "class_2", "class_4"]
    assert "split file" in splits.info["split"]


def test_folder_split_file_must_list_every_class(tmp_path):
    make_folder(tmp_path, num_classes=3, per_class=1)
    split_file = tmp_path.parent / "my_split.txt"
    split_file.write_text("class_0 train\nclass_1 test\n")
    with pytest.raises(ValueError, match=r"class folders \['class_2'\] are not listed"):
        load_splits("folder", tmp_path, image_size=16, split_file=split_file)
    split_file.write_text("class_0 train\nclass_1 test\nclass_2 test\nclass_9 train\n")
    with pytest.raises(ValueError, match="class_9"):
        load_splits("folder", tmp_path, image_size=16, split_file=split_file)
    split_file.write_text("class_0 train\nclass_1 holdout\n")
    with pytest.raises(ValueError, match="holdout"):
        load_splits("folder", tmp_path, image_size=16, split_file=split_file)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_splits("folder", tmp_path / "nope", image_size=16)
    write_image(tmp_path / "only" / "a.png", 0, fmt="PNG")
    with pytest.raises(ValueError, match="at least 2 class folders"):
        load_splits("folder", tmp_path, image_size=16)


# -- CSV ----------------------------------------------------------------------------------------


def test_csv_relative_and_absolute_paths_and_val_rows(tmp_path):
    rows = ["path,label,split"]
    for c, split in enumerate(["train", "train", "val", "test", "test"]):
        for k in range(2):
            relative = f"imgs/{c}_{k}.jpg"
            write_image(tmp_path / relative, c * 10 + k)
            path = relative if k == 0 else str(tmp_path / relative)
            rows.append(f"{path},bird {c},{split}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    splits = load_splits("csv", tmp_path / "list.csv", image_size=16)
    assert splits.train.class_names == ["bird 0", "bird 1"]
    assert splits.val.class_names == ["bird 2"]
    assert splits.test.class_names == ["bird 3", "bird 4"]
    assert len(splits.test) == 4
    assert splits.test.describe(0) == str(tmp_path / "imgs/3_0.jpg")
    assert splits.test[0][0].shape == (3, 16, 16)
    # a folder holding exactly one csv works as root
    assert load_splits("csv", tmp_path, image_size=16).test.class_names == ["bird 3", "bird 4"]


def test_csv_carves_val_when_no_val_rows(tmp_path):
    rows = ["label,split,path,extra"]
    for c in range(8):
        write_image(tmp_path / f"{c}.jpg", c)
        rows.append(f"{c},{'test' if c >= 4 else 'train'},{c}.jpg,x")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    splits = load_splits("csv", tmp_path / "data.csv", image_size=16, val_fraction=0.25)
    assert splits.val.num_classes == 1 and splits.train.num_classes == 3
    assert splits.test.class_names == ["4", "5", "6", "7"]


def test_csv_errors(tmp_path):
    write_image(tmp_path / "a.jpg", 0)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.jpg,1\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['split'\]"):
        load_splits("csv", bad, image_size=16)
    bad.write_text("path,label,split\na.jpg,1,train\na.jpg,1,test\n")
    with pytest.raises(ValueError, match=r"labels \['1'\] appear in both train and test"):
        load_splits("csv", bad, image_size=16)
    bad.write_text("path,label,split\na.jpg,1,training\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: split must be"):
        load_splits("csv", bad, image_size=16)
    bad.write_text("path,label,split\na.jpg,1,train\nmissing.jpg,2,test\n")
    with pytest.raises(ImageReadError, match=r"missing\.jpg"):
        load_splits("csv", bad, image_size=16)


# -- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_uses_both_files_and_splits_by_class(tmp_path, gz):
    images, labels = make_idx(tmp_path / "mnist", per_class=(3, 2), gz=gz)
    splits = load_splits("idx", tmp_path / "mnist", image_size=32, val_fraction=0.2, seed=0)
    assert splits.channels == 1 and splits.source == "idx"
    assert splits.test.class_names == ["5", "6", "7", "8", "9"]
    assert sorted(splits.train.class_names + splits.val.class_names) == ["0", "1", "2", "3", "4"]
    assert splits.val.num_classes == 1
    assert len(splits.test) == 25 and len(splits.train) + len(splits.val) == 25
    for part in (splits.train, splits.val, splits.test):
        for i in range(len(part)):
            pixels = np.asarray(part.load_image(i))
            original = int(pixels[0, 0])  # each image stores its index in the concatenated data
            np.testing.assert_array_equal(pixels, images[original])
            assert part.class_names[part.labels[i]] == str(labels[original])
    assert splits.test[0][0].shape == (1, 32, 32)


def test_idx_options_and_fashion_names(tmp_path):
    make_idx(tmp_path / "fashion-mnist", per_class=(2, 1))
    splits = load_splits("idx", tmp_path / "fashion-mnist", image_size=28, test_classes=[0, 9])
    assert splits.test.class_names == ["T-shirt/top", "Ankle boot"]
    with pytest.raises(ValueError, match="test_classes"):
        load_splits("idx", tmp_path / "fashion-mnist", image_size=28, test_classes=[12])


def test_idx_reader_checks_the_header(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), array)
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "rb") as handle:
        data = handle.read()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_splits("idx", tmp_path, image_size=28)


# -- FileImageDataset ---------------------------------------------------------------------------


def test_file_dataset_contract_and_errors(tmp_path):
    write_image(tmp_path / "a.png", 1, fmt="PNG")
    write_corrupt(tmp_path / "b.jpg")
    with pytest.raises(ImageReadError, match=r"b\.jpg \(cannot identify image file\); 1 of 2"):
        FileImageDataset(["a.png", "b.jpg"], [0, 1], ["x", "y"], root=tmp_path, mode="L")
    dataset = FileImageDataset(
        ["a.png", "b.jpg"], [0, 1], ["x", "y"], root=tmp_path, mode="L", _verified=True
    )
    assert dataset.load_image(0).mode == "L" and dataset.describe(1) == str(tmp_path / "b.jpg")
    with pytest.raises(ImageReadError, match=r"cannot read image .*b\.jpg"):
        dataset.load_image(1)
    with pytest.raises(ValueError, match="labels must lie in"):
        FileImageDataset(["a.png"], [3], ["x"], root=tmp_path)
    with pytest.raises(ValueError, match="2 image paths but 1 labels"):
        FileImageDataset(["a.png", "b.jpg"], [0], ["x"], root=tmp_path)
    with pytest.raises(ValueError, match="mode"):
        FileImageDataset(["a.png"], [0], ["x"], root=tmp_path, mode="CMYK")
    with pytest.warns(UserWarning, match="skipped 1"):
        skipping = FileImageDataset(
            ["a.png", "b.jpg"], [0, 1], ["x", "y"], root=tmp_path, skip_corrupt=True
        )
    assert len(skipping) == 1 and skipping.skipped == 1
    # a class whose only image is unreadable on load cannot be replaced: a clear error
    lonely = FileImageDataset(
        ["b.jpg"], [0], ["y"], root=tmp_path, _verified=True, skip_corrupt=True
    )
    with pytest.raises(ImageReadError, match="no other image of class 'y'"):
        lonely.load_image(0)
