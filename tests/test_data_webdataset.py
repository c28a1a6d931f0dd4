"""``data.source=webdataset``: tar shards and a label list, class-disjoint splits from the list,
the training split streamed (each sample once per pass over every rank and worker), P x K batches
over the stream, bad shards refused in one line before training."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from mbdl.cli import main
from mbdl.data import load_splits
from mbdl.data.stream_batches import StreamBatches, StreamingPKBatcher
from mbdl.data.webdataset import WebDatasetError

wds = pytest.importorskip("webdataset")

CLASSES = 12
SHARDS = 3
PER_SHARD = 32  # samples, classes dealt in turn: 8 images per class


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(
    root: Path, *, label: str = "cls", shards: int = SHARDS, per_shard: int = PER_SHARD
) -> Path:
    """``shards`` shards of ``per_shard`` samples (labels dealt in turn) and ``classes.txt``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"kind_{c}\n" for c in range(CLASSES)))
    number = 0
    for shard in range(shards):
        with wds.TarWriter(str(root / f"shard-{shard:03d}.tar")) as writer:
            for _ in range(per_shard):
                c = number % CLASSES
                sample: dict[str, object] = {"__key__": f"s{number:05d}", "png": _png(number)}
                if label == "cls":
                    sample["cls"] = c
                else:  # a .json label: the index, or the name for odd samples
                    value = f"kind_{c}" if number % 2 else c
                    sample["json"] = json.dumps({"label": value}).encode()
                writer.write(sample)
                number += 1
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("wds") / "shards")


def _train_keys(splits: object) -> Counter[str]:
    """Every training sample's ``shard:key``, from the header pass."""
    stream = splits.train  # type: ignore[attr-defined]
    keys: Counter[str] = Counter()
    for _data, label, where in stream.raw_samples(0, 0, 1):
        keys[where] += 1
        assert 0 <= label < len(stream.class_names)
    return keys


def test_splits_are_class_disjoint_from_the_label_list(shards: Path) -> None:
    splits = load_splits("webdataset", shards, image_size=16, val_fraction=0.25, seed=0)
    assert isinstance(splits.train, IterableDataset)  # streamed, not loaded
    names = [set(getattr(splits, s).class_names) for s in ("train", "val", "test")]
    assert names[0].isdisjoint(names[1]) and names[0].isdisjoint(names[2])
    assert names[1].isdisjoint(names[2])
    assert names[2] == {f"kind_{c}" for c in range(CLASSES // 2, CLASSES)}  # the list's last half
    assert set().union(*names) == {f"kind_{c}" for c in range(CLASSES)}
    total = SHARDS * PER_SHARD
    assert len(splits.train) + len(splits.val) + len(splits.test) == total
    assert sum(_train_keys(splits).values()) == len(splits.train)
    image, label = splits.test[0]
    assert tuple(image.shape) == (3, 16, 16) and 0 <= label < len(splits.test.class_names)
    # the image read at its offset is the stored one: the first test sample is number 6
    assert np.array_equal(
        np.asarray(splits.test.load_image(0)), np.asarray(Image.open(io.BytesIO(_png(6))))
    )
    # another seed carves other validation classes from the same list
    other = load_splits("webdataset", shards, image_size=16, val_fraction=0.25, seed=1)
    assert set(other.test.class_names) == names[2]


def test_json_labels_by_index_or_name(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "json", label="json")
    splits = load_splits("webdataset", root, image_size=16, val_fraction=0.25)
    counts = np.bincount(splits.test.labels)
    assert counts.tolist() == [8] * (CLASSES // 2)


@pytest.mark.parametrize(("shard_count", "parts"), [(3, 1), (3, 2), (3, 3), (3, 5), (1, 4)])
def test_every_sample_once_per_pass_over_all_parts(
    tmp_path: Path, shard_count: int, parts: int
) -> None:
    root = write_shards(tmp_path / "s", shards=shard_count, per_shard=96 // shard_count)
    splits = load_splits("webdataset", root, image_size=16, val_fraction=0.25)
    everything = _train_keys(splits)
    for pass_number in (0, 1):
        seen: Counter[str] = Counter()
        for part in range(parts):
            for _, label, where in splits.train.raw_samples(pass_number, part, parts):
                seen[where] += 1
                assert 0 <= label < len(splits.train.class_names)
        assert seen == everything  # each training sample exactly once, nothing else


def test_loader_workers_share_the_stream(shards: Path) -> None:
    splits = load_splits("webdataset", shards, image_size=16, val_fraction=0.25)
    loader = DataLoader(splits.train, batch_size=None, num_workers=2)
    labels = [int(label) for _, label in loader]
    assert Counter(labels) == Counter(splits.train.labels.tolist())


def _check_batches(batches: list[list[tuple[int, int]]], p: int, k: int) -> None:
    for batch in batches:
        counts = Counter(label for _, label in batch)
        assert len(batch) == p * k and len(counts) == p and set(counts.values()) == {k}


@pytest.mark.parametrize("capacity", [8, 12, 40, 1000])
def test_streaming_batcher_gives_p_by_k_within_its_memory(capacity: int) -> None:
    p, k = 2, 4
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=2000)
    batcher: StreamingPKBatcher[int] = StreamingPKBatcher(p, k, capacity, np.random.default_rng(1))
    batches = []
    emitted: Counter[int] = Counter()
    for item, label in enumerate(labels.tolist()):
        for batch in batcher.add(item, label):
            batches.append(batch)
            emitted.update(i for i, _ in batch)
        assert batcher.held <= capacity
    assert batcher.peak <= capacity and (batches or capacity == p * k)
    _check_batches(batches, p, k)
    assert max(emitted.values(), default=1) == 1  # no item twice
    assert all(labels[i] == label for batch in batches for i, label in batch)
    # everything is either emitted, dropped or still held
    assert sum(emitted.values()) + batcher.dropped + batcher.held == len(labels)
    if capacity >= 1000:
        assert batcher.dropped == 0


def test_streaming_batcher_drops_the_oldest_when_full() -> None:
    batcher: StreamingPKBatcher[str] = StreamingPKBatcher(2, 2, 5, np.random.default_rng(0))
    for item, label in [("a0", 0), ("b0", 1), ("b1", 1), ("c0", 2), ("d0", 3)]:
        assert batcher.add(item, label) == []  # class 1 is ready alone
    assert batcher.add("a1", 0) == [] and batcher.dropped == 1  # a0, the oldest, goes
    assert batcher.add("c1", 2) == [] and batcher.dropped == 2  # b0 goes: class 1 not ready
    (batch,) = batcher.add("d1", 3)  # b1 goes; classes 2 and 3 are ready
    assert sorted(item for item, _ in batch) == ["c0", "c1", "d0", "d1"]
    assert batcher.dropped == 3 and batcher.held == 1 and batcher.peak == 5


def test_stream_batches_are_p_by_k_of_training_classes(shards: Path) -> None:
    splits = load_splits("webdataset", shards, image_size=16, val_fraction=0.25)
    batches = StreamBatches(splits.train, 3, 2, seed=0)
    batches.set_epoch(0)
    taken = []
    for number, (images, labels) in enumerate(batches):
        assert tuple(images.shape) == (6, 3, 16, 16)
        counts = Counter(labels.tolist())
        assert len(counts) == 3 and set(counts.values()) == {2}
        assert set(counts) <= set(range(len(splits.train.class_names)))
        taken.append((images, labels))
        if number == 2 * len(batches):  # the stream goes on past one pass
            break
    # the same seed and epoch give the same batches; a resumed epoch skips its first batches
    again = StreamBatches(splits.train, 3, 2, seed=0)
    again.set_epoch(0, start_batch=2)
    resumed = next(iter(again))
    assert torch.equal(resumed[0], taken[2][0]) and torch.equal(resumed[1], taken[2][1])


def test_training_on_shards_trains_and_evaluates(shards: Path, tmp_path: Path) -> None:
    args = [
        "data.source=webdataset",
        f"data.root={shards}",
        "data.image_size=16",
        "data.val_fraction=0.34",
        "data.num_workers=0",
        "model.backbone=smallcnn",
        "model.embedding_dim=8",
        "train.epochs=1",
        "train.batch_classes=2",
        "train.batch_per_class=2",
        "train.max_steps_per_epoch=2",
        "train.device=cpu",
        "train.num_threads=1",
        "train.progress=false",
        "eval.ks=[1]",
        "eval.report=false",
        f"out={tmp_path / 'run'}",
    ]
    assert main(["train", *args]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "test" in metrics and 0 <= metrics["test"]["recall@1"] <= 1


def test_scan_reports_the_stream(shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = ["data.source=webdataset", f"data.root={shards}", "data.val_fraction=0.34"]
    code = main(["scan", *keys, "--per-class"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("data webdataset: train ")


def _break(root: Path, how: str) -> None:
    first = root / "shard-000.tar"
    if how == "corrupt":
        first.write_bytes(b"\x01" * 2048)
    elif how == "truncated":
        data = first.read_bytes()
        first.write_bytes(data[: len(data) // 2])
    elif how in ("no image", "no label", "out of range", "unknown name"):
        with wds.TarWriter(str(root / "shard-009.tar")) as writer:
            sample: dict[str, object] = {"__key__": "bad"}
            if how != "no image":
                sample["png"] = _png(0)
            if how == "out of range":
                sample["cls"] = CLASSES
            elif how == "unknown name":
                sample["json"] = json.dumps({"label": "kind_99"}).encode()
            elif how == "no image":
                sample["cls"] = 0
            writer.write(sample)
    elif how == "no list":
        (root / "classes.txt").unlink()
    elif how == "list too long":
        with open(root / "classes.txt", "a") as file:
            file.write("kind_extra\n")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("corrupt", "is not a readable tar file"),
        ("truncated", "shard-000.tar"),
        ("no image", "sample 'bad' has no image"),
        ("no label", "sample 'bad' has no label"),
        ("out of range", "outside the label list's 0..11"),
        ("unknown name", "'kind_99' is not in the label list"),
        ("no list", "no label list"),
        ("list too long", "no shard holds ('kind_extra')"),
    ],
)
def test_bad_shards_are_one_line_before_training(
    tmp_path: Path, how: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_shards(tmp_path / "bad")
    _break(root, how)
    with pytest.raises(WebDatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_splits("webdataset", root, image_size=16)
    code = main(["train", "data.source=webdataset", f"data.root={root}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_shard_cut_anywhere_is_refused(tmp_path: Path) -> None:
    import tarfile

    from mbdl.data.webdataset import index_shard

    root = write_shards(tmp_path / "cut", shards=1, per_shard=6)
    shard = root / "shard-000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as archive:
        archive.getmembers()
        end = archive.offset  # the end-of-archive marker starts here
    names = [f"kind_{c}" for c in range(CLASSES)]
    assert len(index_shard(shard, names)) == 6
    for cut in range(1, end + 2 * tarfile.BLOCKSIZE, 97):  # in headers, data and the marker
        shard.write_bytes(data[:cut])
        with pytest.raises(WebDatasetError, match=r"shard-000\.tar"):
            index_shard(shard, names)


def test_stream_batches_through_loader_workers(shards: Path) -> None:
    """Two loader workers: every batch P x K of training classes; a resumed epoch starts at the
    same batch with the same number of workers."""
    splits = load_splits("webdataset", shards, image_size=16, val_fraction=0.25)
    batches = StreamBatches(splits.train, 2, 2, seed=3)
    loader = DataLoader(batches, batch_size=None, num_workers=2)
    taken = []
    for number, (images, labels) in enumerate(loader):
        counts = Counter(labels.tolist())
        assert len(counts) == 2 and set(counts.values()) == {2}
        taken.append((images, labels))
        if number == 4:
            break
    for start, expected in ((4, 4), (3, 2)):  # resumed at a multiple of the worker count
        batches.set_epoch(0, start_batch=start)
        resumed = next(iter(DataLoader(batches, batch_size=None, num_workers=2)))
        assert torch.equal(resumed[0], taken[expected][0])
        assert torch.equal(resumed[1], taken[expected][1])


def test_ranks_read_disjoint_samples(shards: Path) -> None:
    splits = load_splits("webdataset", shards, image_size=16, val_fraction=0.25)
    firsts = []
    for rank in (0, 1):
        batches = StreamBatches(splits.train, 2, 2, seed=0, num_replicas=2, rank=rank)
        raw = batches.raw_batches(0, 1)
        firsts.append({where for batch in (next(raw), next(raw)) for (_, where), _ in batch})
    assert len(firsts[0]) == len(firsts[1]) == 8 and firsts[0].isdisjoint(firsts[1])


@pytest.mark.slow
def test_torchrun_on_shards(shards: Path, tmp_path: Path) -> None:
    """Two processes with a loader worker each read the stream in four parts, take the same
    number of steps and train and evaluate."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "mbdl", "train", "data.source=webdataset"]
    command += [f"data.root={shards}", "data.image_size=16", "data.val_fraction=0.34"]
    command += ["data.num_workers=1", "model.backbone=smallcnn", "model.embedding_dim=8"]
    command += ["train.epochs=2", "train.batch_classes=2", "train.batch_per_class=2"]
    command += ["train.device=cpu", "train.num_threads=1", "train.progress=false"]
    command += ["eval.ks=[1]", "eval.report=false", f"out={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "test" in json.loads((run / "metrics.json").read_text())


def test_an_undecodable_training_image_names_its_shard(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "badimage", shards=1)
    with wds.TarWriter(str(root / "shard-001.tar")) as writer:
        for number in range(8):  # class 0 is a training class at val_fraction=0
            writer.write({"__key__": f"x{number}", "png": b"not an image", "cls": 0})
    splits = load_splits("webdataset", root, image_size=16, val_fraction=0)
    with pytest.raises(WebDatasetError, match=r"shard-001\.tar at byte \d+: not a readable image"):
        for _ in itertools.islice(StreamBatches(splits.train, 2, 2), 100):  # about 4 passes
            pass
