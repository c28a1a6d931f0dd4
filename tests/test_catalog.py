"""The catalog index: build from a folder, add, remove, search (library and command), and its
refusals: another model, another dimension, a concurrent writer, a crash mid-build or mid-add,
a damaged database or faiss file, an output that is not an index, a bad factory string."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("faiss")

import mbdl
from mbdl.catalog import (
    Catalog,
    Searcher,
    add_to_catalog,
    build_catalog,
    check_factory,
    default_factory,
    remove_from_catalog,
)
from mbdl.catalog.store import writer_lock
from mbdl.cli import main
from mbdl.errors import UserError
from mbdl.export import save_pretrained
from mbdl.models import build_model
from mbdl.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model("smallcnn", 8, in_channels=1)
    state = {
        "config": {},
        "model_args": dict(model.build_args),
        "data_args": {"image_size": 16, "channels": 1},
        "model_state": model.state_dict(),
    }
    save_checkpoint(folder / f"model{seed}.pt", state)
    return save_pretrained(folder / f"model{seed}.pt", folder / f"model{seed}")


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (18, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("catalog")
    images = root / "images"
    for i in range(30):
        _image(images / ("cats", "dogs", "birds")[i % 3] / f"img{i:02d}.png", i)
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "images": images, "model": _model(root, 0), "other": _model(root, 1)}


@pytest.fixture
def folder(setup: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the image folder (tests change it)."""
    copy = tmp_path / "images"
    shutil.copytree(setup["images"], copy)
    return copy


def _build(setup: dict[str, Any], folder: Path, out: Path, **options: Any) -> Any:
    return build_catalog(setup["model"], out, images=folder, progress=False, **options)


def test_build_search_round_trip(setup: dict[str, Any], folder: Path, tmp_path: Path) -> None:
    report = _build(setup, folder, tmp_path / "c.index", labels="folders")
    catalog = report.catalog
    assert len(catalog) == 30 and catalog.dim == 8 and catalog.factory == "Flat"
    assert report.skipped == [(str((folder / "notes.txt").resolve()), report.skipped[0][1])]
    assert (tmp_path / "c.index" / "skipped.txt").read_text().startswith(str(folder.resolve()))
    item = catalog.item_by_path(folder / "dogs" / "img01.png")
    assert item is not None and item.label == "dogs" and item.size > 0 and len(item.sha256) == 64
    assert sorted(catalog.ids().tolist()) == list(range(30))
    # a query image is its own nearest neighbour, at distance ~0; distances ascend
    searcher = Searcher.open(tmp_path / "c.index")
    results = searcher.search([folder / "dogs" / "img01.png"], k=4, threshold=0.01)
    first = results[0].neighbours
    assert first[0].id == item.id and first[0].distance < 1e-5 and first[0].match is True
    assert [n.rank for n in first] == [1, 2, 3, 4]
    assert all(a.distance <= b.distance for a, b in itertools.pairwise(first))
    # the distances are the model's euclidean distances between stored vectors
    vectors = catalog.vectors([n.id for n in first])
    expected = np.linalg.norm(vectors - catalog.vectors([item.id]), axis=1)
    assert np.allclose([n.distance for n in first], expected, atol=1e-5)
    assert results[0].to_json() == {
        "query": str(folder / "dogs" / "img01.png"),
        "neighbours": [
            {
                "rank": n.rank,
                "id": n.id,
                "path": n.path,
                "distance": n.distance,
                "label": n.label,
                "match": n.match,
            }
            for n in first
        ],
    }
    # by embeddings: the same neighbours, no match flags without a threshold
    by_vector = mbdl.search(tmp_path / "c.index", catalog.vectors([item.id]), k=4)
    assert [n.id for n in by_vector[0].neighbours] == [n.id for n in first]
    assert by_vector[0].query == "embedding[0]"
    assert "match" not in by_vector[0].neighbours[0].to_json()
    assert mbdl.Searcher is Searcher


def test_add_is_incremental_and_ids_are_never_reused(
    setup: dict[str, Any], folder: Path, tmp_path: Path
) -> None:
    index = tmp_path / "c.index"
    _build(setup, folder, index)
    again = add_to_catalog(index, images=folder, progress=False)
    assert again.added == 0 and again.unchanged == 30 and len(again.catalog) == 30
    changed = folder / "cats" / "img00.png"
    old = Catalog.open(index).item_by_path(changed)
    assert old is not None
    _image(changed, 1000)  # new content
    _image(folder / "new" / "extra.png", 1001)
    touched = folder / "dogs" / "img01.png"
    touched_before = Catalog.open(index).item_by_path(touched)
    assert touched_before is not None
    os.utime(touched, (1_000_000, 1_000_000))  # same content, new mtime
    report = add_to_catalog(index, images=folder, progress=False)
    assert (report.added, report.changed, report.touched) == (2, 1, 1)
    catalog = report.catalog
    assert len(catalog) == 31
    new = catalog.item_by_path(changed)
    assert new is not None and new.id == 30 and new.sha256 != old.sha256
    assert old.id not in catalog.ids().tolist()
    touched_item = catalog.item_by_path(touched)
    assert touched_item is not None and touched_item.mtime == 1_000_000
    assert touched_item.id == touched_before.id
    # the re-embedded vector is the new image's: it is its own nearest neighbour
    hit = Searcher.open(index).search([changed], k=1)[0].neighbours[0]
    assert hit.id == new.id and hit.distance < 1e-5
    # remove, then add back: a new id
    removed = remove_from_catalog(index, [changed])
    assert removed.removed == 1 and len(removed.catalog) == 30
    back = add_to_catalog(index, images=folder, progress=False)
    again_item = back.catalog.item_by_path(changed)
    assert back.added == 1 and again_item is not None and again_item.id == 32
    # --missing drops items whose file is gone; a folder PATH drops everything below it
    (folder / "new" / "extra.png").unlink()
    assert remove_from_catalog(index, missing=True).removed == 1
    assert remove_from_catalog(index, [folder / "birds"]).removed == 10
    assert len(Catalog.open(index)) == 20
    with pytest.raises(UserError, match="is not in the catalog"):
        remove_from_catalog(index, [folder / "birds" / "img02.png"])


@pytest.mark.parametrize("factory", ["HNSW8", "IVF2,Flat", "IVF2,SQ8"])
def test_approximate_factories_add_remove_search(
    setup: dict[str, Any], folder: Path, tmp_path: Path, factory: str
) -> None:
    index = tmp_path / "c.index"
    report = _build(setup, folder, index, factory=factory)
    assert report.factory == factory and 0.0 < report.recall["recall"] <= 1.0
    assert Catalog.open(index).recall == report.recall
    target = folder / "cats" / "img03.png"
    removed = remove_from_catalog(index, [target])  # HNSW cannot remove: rebuilt
    assert len(removed.catalog) == 29 and removed.catalog.index.ntotal == 29
    found = Searcher.open(index).search([target], k=29)[0].neighbours
    assert len(found) == 29 or factory.startswith("IVF")  # IVF probes a subset of lists
    assert all(n.path != str(target.resolve()) for n in found)
    _image(folder / "new.png", 77)
    added = add_to_catalog(index, images=folder, progress=False)
    assert added.added == 2 and len(added.catalog) == 31  # the removed file and the new one


def test_range_search_equals_brute_force(
    setup: dict[str, Any], folder: Path, tmp_path: Path
) -> None:
    catalog = _build(setup, folder, tmp_path / "c.index").catalog
    ids = catalog.ids()
    vectors = catalog.vectors(ids)
    queries = vectors[:3]
    full = np.linalg.norm(queries[:, None] - vectors[None], axis=2)
    radius = float(np.median(full))
    lims, distances, found = catalog.range_search(queries, radius)
    for q in range(3):
        expected = set(ids[full[q] <= radius].tolist())
        assert set(found[lims[q] : lims[q + 1]].tolist()) == expected
        assert (distances[lims[q] : lims[q + 1]] <= radius).all()


def test_another_model_and_dimension_refused(
    setup: dict[str, Any], folder: Path, tmp_path: Path
) -> None:
    index = tmp_path / "c.index"
    _build(setup, folder, index)
    with pytest.raises(UserError, match="is not the one that built"):
        Searcher.open(index, model=setup["other"])
    with pytest.raises(UserError, match="is not the one that built"):
        add_to_catalog(index, images=folder, model=setup["other"], progress=False)
    with pytest.raises(UserError, match="dimension 4, the catalog"):
        Searcher.open(index).search(np.zeros((2, 4), np.float32))
    code = main(
        ["search", str(index), str(folder / "cats" / "img00.png"), "--model", str(setup["other"])]
    )
    assert code == 2


def test_concurrent_writer_refused(setup: dict[str, Any], folder: Path, tmp_path: Path) -> None:
    index = tmp_path / "c.index"
    _build(setup, folder, index)
    with writer_lock(index), pytest.raises(UserError, match="being updated by another"):
        add_to_catalog(index, images=folder, progress=False)
    assert add_to_catalog(index, images=folder, progress=False).unchanged == 30  # released


_KILLER = """
import os, signal, sys
import mbdl.catalog.build as build
build.COMMIT_EVERY = 4
target = build.{function}
calls = []
def killing(*args, **kwargs):
    result = target(*args, **kwargs)
    calls.append(1)
    if len(calls) == {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
build.{function} = killing
{call}
"""


def _run_killed(function: str, after: int, call: str) -> int:
    script = _KILLER.format(function=function, after=after, call=call)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    return done.returncode


def test_sigkill_mid_build_resumes(setup: dict[str, Any], folder: Path, tmp_path: Path) -> None:
    index = tmp_path / "c.index"
    call = (
        f"build.build_catalog({str(setup['model'])!r}, {str(index)!r}, "
        f"images={str(folder)!r}, batch_size=2, progress=False)"
    )
    assert _run_killed("_commit_chunk", 3, call) == -signal.SIGKILL
    assert not index.exists()  # never half-written
    with pytest.raises(UserError):
        Catalog.open(index)
    report = _build(setup, folder, index, batch_size=2)
    assert report.resumed == 12 and len(report.catalog) == 30  # 3 chunks of 4 were committed
    fresh = _build(setup, folder, tmp_path / "fresh.index")
    for item in fresh.catalog.iter_items():
        resumed = report.catalog.item_by_path(item.path)
        assert resumed is not None
        assert np.allclose(report.catalog.vectors([resumed.id]), fresh.catalog.vectors([item.id]))


def test_sigkill_mid_add_keeps_the_previous_index(
    setup: dict[str, Any], folder: Path, tmp_path: Path
) -> None:
    index = tmp_path / "c.index"
    _build(setup, folder, index)
    _image(folder / "late.png", 99)
    call = f"build.add_to_catalog({str(index)!r}, images={str(folder)!r}, progress=False)"
    # killed after the new faiss file is written, before the SQLite commit that switches to it
    assert _run_killed("write_faiss", 1, call) == -signal.SIGKILL
    catalog = Catalog.open(index)
    assert len(catalog) == 30 and catalog.item_by_path(folder / "late.png") is None
    hit = Searcher.open(index).search([folder / "cats" / "img00.png"], k=1)[0].neighbours[0]
    assert hit.distance < 1e-5
    report = add_to_catalog(index, images=folder, progress=False)
    assert report.added == 1 and len(report.catalog) == 31
    assert sorted(p.name for p in index.glob("index.*.faiss")) == ["index.1.faiss", "index.2.faiss"]


def _one_line_refusal(index: Path, query: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["search", str(index), str(query)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mbdl: error: ") and err.count("\n") == 1
    return err


def test_damaged_catalogs_refused_in_one_line(
    setup: dict[str, Any], folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.index"
    _build(setup, folder, base)
    query = folder / "cats" / "img00.png"

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(base, target)
        return target

    truncated = copy("truncated-db")
    database = truncated / "items.sqlite"
    database.write_bytes(database.read_bytes()[: database.stat().st_size // 2])
    assert "truncated" in _one_line_refusal(truncated, query, capsys)
    garbage = copy("garbage-db")
    (garbage / "items.sqlite").write_bytes(b"\0" * 4096)
    assert "not an SQLite database" in _one_line_refusal(garbage, query, capsys)
    trigger = copy("trigger-db")
    with sqlite3.connect(trigger / "items.sqlite") as connection:
        connection.execute("CREATE TRIGGER t AFTER INSERT ON items BEGIN DELETE FROM items; END")
    assert "unexpected schema" in _one_line_refusal(trigger, query, capsys)
    short = copy("truncated-faiss")
    faiss_file = short / "index.1.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    assert "truncated or was altered" in _one_line_refusal(short, query, capsys)
    flipped = copy("tampered-faiss")
    data = bytearray((flipped / "index.1.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "index.1.faiss").write_bytes(bytes(data))
    assert "does not match the hash" in _one_line_refusal(flipped, query, capsys)
    vectors = copy("truncated-vectors")
    (vectors / "vectors.f32").write_bytes(b"")
    assert "vectors.f32" in _one_line_refusal(vectors, query, capsys)
    manifest = copy("bad-manifest")
    meta = json.loads((manifest / "catalog.json").read_text())
    (manifest / "catalog.json").write_text(json.dumps({**meta, "dim": -1}))
    assert "dim is invalid" in _one_line_refusal(manifest, query, capsys)
    old = tmp_path / "old.index"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    assert "old format" in _one_line_refusal(old, query, capsys)
    # killed between moving the old catalog aside and moving the new one in (no exchange)
    interrupted = copy("interrupted.index")
    os.replace(interrupted, tmp_path / ".interrupted.index.old")
    with pytest.raises(UserError, match=r"\.interrupted\.index\.old does: a write was interrupted"):
        Catalog.open(interrupted)
    assert "a write was interrupted" in _one_line_refusal(interrupted, query, capsys)


def test_output_that_is_not_an_index_is_refused(
    setup: dict[str, Any], folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    args = ["index", "build", str(setup["model"]), "--images", str(folder), "--no-progress"]
    assert main([*args, "-o", str(run_dir)]) == 2
    assert "not an mbdl index; refused" in capsys.readouterr().err
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir()
    index = tmp_path / "c.index"
    assert main([*args, "-o", str(index)]) == 0
    assert main([*args, "-o", str(index)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "-o", str(index), "--overwrite"]) == 0
    # the --split form too
    assert main(["index", "build", str(setup["model"]), "-o", str(run_dir)]) == 2
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.parametrize(
    "factory",
    [
        "HNSW0",
        "HNSW-1",
        "HNSW1",
        "IVF0,Flat",
        "PQ3",
        "PQ4x99",
        "Foo",
        "",
        "IVF8,PQ4,Flat",
        "OPQ3,PQ4",
        "IVF99999999,Flat",
        "HNSW32,PQ4x4fs",
        "PCA99,Flat",
    ],
)
def test_bad_factory_strings_refused_without_faiss(factory: str) -> None:
    with pytest.raises(UserError) as error:
        check_factory(factory, 8, 1000)
    assert "\n" not in str(error.value) and "--factory" in str(error.value)


def test_good_factory_strings_and_defaults() -> None:
    for factory in [
        "Flat",
        "HNSW32",
        "IVF16,Flat",
        "IVF16,PQ4",
        "IVF16,SQ8",
        "OPQ4,IVF16,PQ4",
        "IVF16_HNSW8,PQ8",
        "PCA4,Flat",
        "SQfp16",
        "IDMap,Flat",
    ]:
        assert check_factory(factory, 8, 10_000).text == factory.removeprefix("IDMap,")
    assert default_factory(1000, 128)[0] == "Flat"
    assert default_factory(500_000, 128)[0] == "HNSW32"
    text, reason = default_factory(10_000_000, 128)
    assert text.startswith("IVF") and ",PQ" in text and "compressed" in reason
    check_factory(text, 128, 10_000_000)


def test_cli_bad_factory_and_aliases_exit_2(
    setup: dict[str, Any], folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "index",
        "build",
        str(setup["model"]),
        "--images",
        str(folder),
        "--no-progress",
        "-o",
        str(tmp_path / "x.index"),
    ]
    for extra in (
        ["--factory", "HNSW0"],
        ["--kind", "hnsw", "--hnsw-m", "0"],
        ["--kind", "hnsw", "--hnsw-m", "-1"],
        ["--factory", "IVF64,Flat"],
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mbdl: error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.index").exists()
    assert (
        main(["index", "build", str(setup["model"]), "--hnsw-m", "0", "-o", str(tmp_path / "y")])
        == 2
    )


def test_on_bad_refuse_and_list_and_embeddings(
    setup: dict[str, Any], folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="1 of 31 files are not readable images"):
        _build(setup, folder, tmp_path / "r.index", on_bad="refuse")
    assert not (tmp_path / "r.index").exists()
    listing = tmp_path / "list.txt"
    listing.write_text("images/cats/img00.png\nimages/dogs/img01.png\nimages/cats/img00.png\n")
    listed = build_catalog(setup["model"], tmp_path / "l.index", list_file=listing, progress=False)
    assert len(listed.catalog) == 2  # a path listed twice is indexed once
    # from mbdl embed output: the same vectors as embedding the images here
    out = tmp_path / "emb" / "x.npy"
    assert (
        main(
            [
                "embed",
                str(setup["model"]),
                "--images",
                str(folder / "cats"),
                "-o",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    report = build_catalog(
        setup["model"], tmp_path / "e.index", embeddings=out, images=folder / "cats", progress=False
    )
    direct = _build(setup, folder / "cats", tmp_path / "d.index")
    assert len(report.catalog) == len(direct.catalog) == 10
    for item in direct.catalog.iter_items():
        other = report.catalog.item_by_path(item.path)
        assert other is not None and other.sha256 == item.sha256
        assert np.allclose(
            report.catalog.vectors([other.id]), direct.catalog.vectors([item.id]), atol=1e-6
        )


def test_cli_build_add_remove_search(
    setup: dict[str, Any], folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = str(tmp_path / "c.index")
    build = [
        "index",
        "build",
        str(setup["model"]),
        "--images",
        str(folder),
        "-o",
        index,
        "--labels",
        "folders",
        "--no-progress",
    ]
    assert main(build) == 0
    out = capsys.readouterr().out
    assert "index: Flat (exact search: 30 items is below" in out
    assert "skipped 1 unreadable or non-image files" in out and "skipped.txt" in out
    query = str(folder / "birds" / "img02.png")
    assert main(["search", index, query, "-k", "3", "--json", "--threshold", "0.001"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == [query]
    first = results[0]["neighbours"][0]
    assert set(first) == {"rank", "id", "path", "distance", "label", "match"}
    assert first["path"] == str(Path(query).resolve()) and first["match"] is True
    assert first["label"] == "birds" and len(results[0]["neighbours"]) == 3
    assert main(["search", index, "--images", str(folder / "dogs"), "-k", "1"]) == 0
    table = capsys.readouterr().out
    assert table.count("query ") == 10 and "'dogs'" in table
    assert main(["search", index, query, "--threshold"]) == 2  # the model has no threshold
    assert "no validated verification threshold" in capsys.readouterr().err
    _image(folder / "dogs" / "late.png", 5)
    assert main(["index", "add", index, "--images", str(folder), "--no-progress"]) == 0
    assert "1 added" in capsys.readouterr().out
    assert main(["index", "remove", index, str(folder / "dogs" / "late.png")]) == 0
    assert "30 items" in capsys.readouterr().out
    assert main(["index", "remove", index, str(folder / "nope.png")]) == 2
    # the old spelling, MODEL --index INDEX, searches the catalog with that model
    assert main(["search", str(setup["model"]), "--index", index, query, "-k", "1"]) == 0
    assert str(Path(query).resolve()) in capsys.readouterr().out
    assert main(["search", str(setup["other"]), "--index", index, query]) == 2
    assert "is not the one that built" in capsys.readouterr().err


def test_labels_from_a_csv(setup: dict[str, Any], folder: Path, tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text(
        "path,label\ncats/img00.png,tabby\n" + f"{folder / 'dogs' / 'img01.png'},rex\n"
    )
    catalog = _build(setup, folder, tmp_path / "c.index", labels=str(table)).catalog
    labels = {item.path: item.label for item in catalog.iter_items()}
    assert labels[str(folder / "cats" / "img00.png")] == "tabby"
    assert labels[str(folder / "dogs" / "img01.png")] == "rex"
    assert sum(label is not None for label in labels.values()) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n")
    with pytest.raises(UserError, match="expected path,label"):
        _build(setup, folder, tmp_path / "d.index", labels=str(bad))


def test_torchrun_ranks_build_one_index(
    setup: dict[str, Any], folder: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    index = tmp_path / "multi.index"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "mbdl",
            "index",
            "build",
            str(setup["model"]),
            "--images",
            str(folder),
            "-o",
            str(index),
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("built ") == 1  # rank 0 reports
    assert "skipped 1 unreadable" in result.stdout
    multi = Catalog.open(index)
    single = _build(setup, folder, tmp_path / "single.index").catalog
    assert len(multi) == len(single) == 30
    for item in single.iter_items():
        other = multi.item_by_path(item.path)
        assert other is not None and other.id == item.id and other.sha256 == item.sha256
    assert np.allclose(multi.vectors(multi.ids()), single.vectors(single.ids()), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "multi.index", "single.index"]
