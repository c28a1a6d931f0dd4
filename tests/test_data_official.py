"""The official-layout sources (CUB-200-2011, Cars196, SOP, In-Shop): the literature's
class-disjoint splits, their download/extract code on local archives, and corrupt-file handling."""

from __future__ import annotations

import urllib.error
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fixtures_data import (
    make_cars,
    make_cub,
    make_inshop,
    make_sop,
    make_tgz,
    write_corrupt,
    write_undecodable_png,
)
from mbdl.data import cars, cub, inshop, load_splits, sop
from mbdl.data.download import DownloadError, extract_archive, md5sum
from mbdl.data.files import ImageReadError


def original_ids(dataset, parse=int) -> set[int]:
    """The class ids behind a CUB-style dataset's class names ("017.Name" -> 17)."""
    return {parse(name) for name in dataset.class_names}


def cub_id(name: str) -> int:
    return int(name.split(".")[0])


@pytest.fixture(scope="module")
def cub_tgz(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cub_build")
    make_cub(build, images_per_class=2)
    return make_tgz(
        build / "CUB_200_2011", tmp_path_factory.mktemp("cub_archive") / "CUB_200_2011.tgz"
    )


@pytest.fixture(scope="module")
def cub_root(cub_tgz, tmp_path_factory) -> Path:
    """CUB extracted by our download code from a file:// URL to the local archive."""
    root = tmp_path_factory.mktemp("cub")
    folder = cub.download(root, url=cub_tgz.as_uri(), md5=md5sum(cub_tgz))
    assert folder == root / "CUB_200_2011"
    return root


# -- CUB-200-2011 -------------------------------------------------------------------------------


def test_cub_split_is_classes_1_100_vs_101_200(cub_root):
    splits = load_splits("cub", cub_root, image_size=32, val_fraction=0.15, seed=0)
    train_ids = original_ids(splits.train, lambda n: cub_id(n))
    val_ids = original_ids(splits.val, lambda n: cub_id(n))
    test_ids = original_ids(splits.test, lambda n: cub_id(n))
    assert test_ids == set(range(101, 201))
    assert train_ids | val_ids == set(range(1, 101))
    assert not train_ids & val_ids
    assert len(val_ids) == 15
    assert (len(splits.train), len(splits.val), len(splits.test)) == (170, 30, 200)
    for part in (splits.train, splits.val, splits.test):
        assert part.labels.dtype == np.int64
        assert sorted(set(part.labels.tolist())) == list(range(part.num_classes))
        assert np.all(np.bincount(part.labels) == 2)
    # labels follow the class names: every image's folder is its class name
    for i in range(0, len(splits.test), 37):
        folder = Path(splits.test.describe(i)).parent.name
        assert folder == splits.test.class_names[splits.test.labels[i]]
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert splits.channels == 3 and splits.source == "cub" and splits.query is None


def test_cub_val_classes_depend_on_seed_only(cub_root):
    a = load_splits("cub", cub_root, image_size=32, seed=1)
    b = load_splits("cub", cub_root, image_size=32, seed=1)
    c = load_splits("cub", cub_root, image_size=32, seed=2)
    assert a.val.class_names == b.val.class_names
    assert a.val.class_names != c.val.class_names


def test_cub_bbox_crop(cub_root):
    plain = cub.load_splits(cub_root, image_size=32)
    boxed = cub.load_splits(cub_root / "CUB_200_2011", image_size=32, bbox=True)
    assert plain.test.load_image(0).size == (12, 10)
    # bounding_boxes.txt says x=1, y=2, width=6, height=5
    assert boxed.test.load_image(0).size == (6, 5)
    full = np.asarray(plain.test.load_image(0))
    np.testing.assert_array_equal(np.asarray(boxed.test.load_image(0)), full[2:7, 1:7])


def test_cub_extract_archive_directly_and_checksum(cub_tgz, tmp_path):
    created = extract_archive(cub_tgz, tmp_path, md5=md5sum(cub_tgz))
    assert created == [tmp_path / "CUB_200_2011"]
    assert (tmp_path / "CUB_200_2011" / "images.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["CUB_200_2011"]  # no staging folder left
    with pytest.raises(DownloadError, match="checksum mismatch"):
        extract_archive(cub_tgz, tmp_path / "other", md5="0" * 32)
    assert not (tmp_path / "other" / "CUB_200_2011").exists()


def test_cub_download_wrong_checksum_leaves_nothing(cub_tgz, tmp_path):
    with pytest.raises(DownloadError, match="checksum mismatch"):
        cub.download(tmp_path, url=cub_tgz.as_uri(), md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_cub_download_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DownloadError) as error:
        cub.download(tmp_path)
    message = str(error.value)
    assert cub.URL in message and "by hand" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []
    assert cub.MD5 == "97eceeb196236b17998738112f37df78"


def test_cub_missing_root_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images\.txt not found"):
        load_splits("cub", tmp_path, image_size=32)


# -- corrupt and missing files --------------------------------------------------------------------


@pytest.fixture()
def small_cub(tmp_path) -> Path:
    make_cub(tmp_path, images_per_class=3, num_classes=200)
    return tmp_path


def test_corrupt_image_error_names_the_file(small_cub):
    bad = small_cub / "CUB_200_2011/images/101.Bird_101/Bird_101_0000_301.jpg"
    write_corrupt(bad)
    # found up front, before any training, by the scan of every image
    with pytest.raises(ImageReadError, match=r"Bird_101_0000_301\.jpg \(cannot identify"):
        load_splits("cub", small_cub, image_size=32)


def test_missing_image_error_names_the_file(small_cub):
    missing = small_cub / "CUB_200_2011/images/005.Bird_5/Bird_5_0001_14.jpg"
    missing.unlink()
    with pytest.raises(ImageReadError, match=r"not found: .*Bird_5_0001_14\.jpg .*1 of 600"):
        load_splits("cub", small_cub, image_size=32)


def test_skip_corrupt_drops_unreadable_files_up_front(small_cub):
    write_corrupt(small_cub / "CUB_200_2011/images/101.Bird_101/Bird_101_0000_301.jpg")
    truncated = small_cub / "CUB_200_2011/images/006.Bird_6/Bird_6_0001_17.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])  # a truncated JPEG fails verify() too
    (small_cub / "CUB_200_2011/images/005.Bird_5/Bird_5_0001_14.jpg").unlink()
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        splits = load_splits("cub", small_cub, image_size=32, skip_corrupt=True, val_fraction=0.0)
    assert splits.info["skipped"] == 3
    assert (splits.train.skipped, splits.test.skipped, splits.val.skipped) == (2, 1, 0)
    assert "Bird_101_0000_301.jpg" in splits.test.skipped_files[0]
    assert (len(splits.train), len(splits.test)) == (298, 299)
    loader = DataLoader(splits.test, batch_size=64)
    assert sum(len(labels) for _, labels in loader) == 299


def test_skip_corrupt_replaces_a_file_that_fails_only_on_decode(small_cub):
    path = small_cub / "CUB_200_2011/images/150.Bird_150/Bird_150_0001_449.jpg"
    original = path.read_bytes()
    write_undecodable_png(path)
    with pytest.warns(UserWarning, match="skipped 1"):  # the up-front scan decodes: found
        scanned = load_splits("cub", small_cub, image_size=32, skip_corrupt=True)
    assert scanned.test.skipped == 1 and "Bird_150_0001_449.jpg" in scanned.test.skipped_files[0]
    with pytest.raises(ImageReadError, match=r"Bird_150_0001_449\.jpg .*skip_corrupt=true"):
        load_splits("cub", small_cub, image_size=32)
    # a file that breaks after the scan (replaced on disk mid-run) is replaced on load
    path.write_bytes(original)
    splits = load_splits("cub", small_cub, image_size=32, skip_corrupt=True)
    write_undecodable_png(path)
    test = splits.test
    assert test.skipped == 0
    index = [test.describe(i) for i in range(len(test))].index(str(path))
    with pytest.warns(UserWarning, match=r"Bird_150_0001_449\.jpg.*instead"):
        batches = list(DataLoader(test, batch_size=50))
    labels = torch.cat([b[1] for b in batches])
    np.testing.assert_array_equal(labels.numpy(), test.labels)  # same class composition
    assert test.skipped == 1
    # in worker processes too: the epoch completes with the same labels
    worker_batches = list(DataLoader(test, batch_size=100, num_workers=1))
    np.testing.assert_array_equal(torch.cat([b[1] for b in worker_batches]).numpy(), test.labels)
    assert "Bird_150_0001_449.jpg" in test.skipped_files[0]
    replacement = np.asarray(test.load_image(index + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later loads use the stand-in silently
        np.testing.assert_array_equal(np.asarray(test.load_image(index)), replacement)
    path.write_bytes(original)
    strict = load_splits("cub", small_cub, image_size=32)
    write_undecodable_png(path)
    with pytest.raises(ImageReadError, match="Bird_150_0001_449"):
        strict.test.load_image(index)
    path.write_bytes(original)


# -- Cars196 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cars_root(tmp_path_factory) -> Path:
    return make_cars(tmp_path_factory.mktemp("cars"), images_per_class=2)


def test_cars_split_is_classes_1_98_vs_99_196(cars_root):
    splits = load_splits("cars", cars_root, image_size=32, val_fraction=0.1, seed=3)

    def ids(dataset):
        return {int(n.split()[2]) for n in dataset.class_names}  # "Make Model <id> 2012"

    assert ids(splits.test) == set(range(99, 197))
    assert ids(splits.train) | ids(splits.val) == set(range(1, 99))
    assert not ids(splits.train) & ids(splits.val)
    assert splits.val.num_classes == round(0.1 * 98)
    assert len(splits.test) == 196 and len(splits.train) + len(splits.val) == 196
    # the annotation's path and class agree with the loaded item
    annotations = cars.read_annotations(cars_root / "cars_annos.mat")
    by_path = dict(zip(annotations["paths"], annotations["class_ids"].tolist(), strict=True))
    for i in range(0, len(splits.test), 23):
        relative = Path(splits.test.describe(i)).relative_to(cars_root).as_posix()
        class_id = by_path[relative]
        assert splits.test.class_names[splits.test.labels[i]] == f"Make Model {class_id} 2012"


def test_cars_bbox_is_one_based_inclusive(cars_root):
    boxed = cars.load_splits(cars_root, image_size=32, bbox=True)
    full = np.asarray(cars.load_splits(cars_root, image_size=32).test.load_image(0))
    # bbox_x1=2, y1=3, x2=9, y2=8 (1-based, inclusive) -> columns 1..8, rows 2..7
    np.testing.assert_array_equal(np.asarray(boxed.test.load_image(0)), full[2:8, 1:9])


def test_cars_download_from_local_files(cars_root, tmp_path):
    archive = make_tgz(cars_root / "car_ims", tmp_path / "car_ims.tgz")
    annotations = cars_root / "cars_annos.mat"
    target = tmp_path / "data"
    cars.download(
        target,
        url=archive.as_uri(),
        md5=md5sum(archive),
        annotations_url=annotations.as_uri(),
        annotations_md5=md5sum(annotations),
    )
    assert (target / "cars_annos.mat").is_file() and len(
        list((target / "car_ims").iterdir())
    ) == 392
    assert len(load_splits("cars", target, image_size=32).test) == 196


def test_cars_bad_mat_file(tmp_path):
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match=r"cars_annos\.mat"):
        load_splits("cars", tmp_path, image_size=32)


# -- Stanford Online Products -------------------------------------------------------------------


def test_sop_split_follows_the_files_and_keeps_super_classes(tmp_path):
    base = make_sop(tmp_path, train_classes=8, test_classes=5, per_class=2)
    splits = load_splits("sop", tmp_path, image_size=32, val_fraction=0.25, seed=0)
    ids = lambda d: {int(n) for n in d.class_names}  # noqa: E731
    assert ids(splits.test) == set(range(9, 14))
    assert ids(splits.train) | ids(splits.val) == set(range(1, 9))
    assert not ids(splits.train) & ids(splits.val) and splits.val.num_classes == 2
    assert len(splits.test) == 10
    for part in (splits.train, splits.val, splits.test):
        for i in range(len(part)):
            class_id = int(part.class_names[part.labels[i]])
            assert part.attributes["super_class_id"][i] == class_id % 3 + 1
            path = Path(part.describe(i))
            assert path.parent.name == f"{part.attributes['super_class_name'][i]}_final"
            assert path.name.startswith(f"{class_id}_")
    # download: a zip of the folder, extracted by our code
    archive = tmp_path / "Stanford_Online_Products.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(base.rglob("*")):
            bundle.write(file, file.relative_to(tmp_path).as_posix())
    target = tmp_path / "downloaded"
    folder = sop.download(target, url=archive.as_uri(), md5=md5sum(archive))
    assert folder == target / "Stanford_Online_Products" and (folder / "Ebay_test.txt").is_file()
    assert len(load_splits("sop", folder, image_size=32).test) == 10


def test_sop_class_in_both_files_is_rejected(tmp_path):
    base = make_sop(tmp_path)
    with open(base / "Ebay_test.txt", "a") as handle:
        handle.write("999 1 2 bicycle_final/1_0.JPG\n")
    with pytest.raises(ValueError, match=r"class ids \[1\] are in both"):
        load_splits("sop", tmp_path, image_size=32)


# -- In-Shop ------------------------------------------------------------------------------------


def test_inshop_query_gallery_share_labels(tmp_path):
    make_inshop(tmp_path, train_items=6, test_items=4)
    splits = load_splits("inshop", tmp_path, image_size=32, val_fraction=0.34, seed=0)
    assert splits.query is not None and splits.gallery is not None
    assert (len(splits.query), len(splits.gallery), len(splits.test)) == (4, 8, 12)
    assert splits.query.class_names == splits.gallery.class_names == splits.test.class_names
    test_items = {f"id_{i:08d}" for i in range(7, 11)}
    assert set(splits.test.class_names) == test_items
    assert set(splits.train.class_names) | set(splits.val.class_names) == {
        f"id_{i:08d}" for i in range(1, 7)
    }
    assert splits.val.num_classes == 2 and not set(splits.train.class_names) & set(
        splits.val.class_names
    )
    for i in range(len(splits.query)):
        item = Path(splits.query.describe(i)).parent.name
        assert splits.query.class_names[splits.query.labels[i]] == item
    for i in range(len(splits.gallery)):
        item = Path(splits.gallery.describe(i)).parent.name
        assert splits.gallery.class_names[splits.gallery.labels[i]] == item
    assert splits.query.transform is not None and splits.gallery.transform is not None
    assert splits.query[0][0].shape == (3, 32, 32)


def test_inshop_download_needs_a_url(tmp_path):
    with pytest.raises(DownloadError, match=r"list_eval_partition\.txt"):
        inshop.download(tmp_path)


def test_inshop_bad_status(tmp_path):
    make_inshop(tmp_path)
    text = (tmp_path / "list_eval_partition.txt").read_text().replace("query", "probe", 1)
    (tmp_path / "list_eval_partition.txt").write_text(text)
    with pytest.raises(ValueError, match="probe"):
        load_splits("inshop", tmp_path, image_size=32)


def test_no_warnings_on_clean_data(cub_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_splits("cub", cub_root, image_size=32, skip_corrupt=True)
