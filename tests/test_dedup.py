"""Duplicates and clusters: the streamed union-find and leader clustering equal all-pairs
references written out plainly; the output folder is atomic and refuses foreign folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mbdl.catalog.dedup import (
    Groups,
    UnionFind,
    check_output_folder,
    check_threshold,
    duplicate_components,
    leader_clusters,
    write_groups,
)
from mbdl.errors import UserError


def _planted(n: int = 300, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    for start in range(0, 100, 10):  # groups of an item and 1..10 near-copies of it
        size = start // 10 + 1
        x[start + 1 : start + 1 + size] = x[start] + 0.01 * rng.normal(size=(size, dim))
    return x


def _exact_range_search(x: np.ndarray, ids: np.ndarray):
    def search(queries: np.ndarray, radius: float):
        d = np.sqrt(((queries[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        lims, found, dist = [0], [], []
        for row in d:
            hit = np.flatnonzero(row <= radius)
            found.append(ids[hit])
            dist.append(row[hit])
            lims.append(lims[-1] + len(hit))
        return np.array(lims), np.concatenate(dist), np.concatenate(found)

    return search


def _reference_components(x: np.ndarray, radius: float) -> set[frozenset[int]]:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    label = list(range(len(x)))
    changed = True
    while changed:  # label propagation: every item takes the smallest label of its neighbours
        changed = False
        for i in range(len(x)):
            smallest = min(label[j] for j in np.flatnonzero(d[i] <= radius))
            if smallest < label[i]:
                label[i], changed = smallest, True
    groups: dict[int, set[int]] = {}
    for i, lab in enumerate(label):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values() if len(g) >= 2}


@pytest.mark.parametrize("batch_size", [1, 7, 4096])
def test_duplicate_components_equal_the_all_pairs_reference(batch_size: int) -> None:
    x = _planted()
    ids = np.arange(len(x), dtype=np.int64) * 3 + 5  # ids are not positions
    groups, examined, within = duplicate_components(
        ids, lambda b: x[(b - 5) // 3], _exact_range_search(x, ids), 0.1, batch_size=batch_size
    )
    expected = _reference_components(x, 0.1)
    assert {frozenset(((g - 5) // 3).tolist()) for g in groups} == expected
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    assert len(groups) == 10 and len(groups[0]) == 11
    assert within == sum(len(g) * (len(g) - 1) // 2 for g in expected)
    assert examined == len(x) + 2 * within


def test_chains_join_into_one_duplicate_group() -> None:
    x = np.array([[0.0], [0.8], [1.6], [5.0]], dtype=np.float32)
    ids = np.arange(4, dtype=np.int64)
    groups, _, _ = duplicate_components(ids, lambda b: x[b], _exact_range_search(x, ids), 1.0)
    assert [g.tolist() for g in groups] == [[0, 1, 2]]
    clusters, _, _ = leader_clusters(ids, lambda b: x[b], _exact_range_search(x, ids), 1.0)
    assert [g.tolist() for g in clusters] == [[0, 1, 2]]  # 1 is densest: 0 and 2 are near it
    x = np.array([[0.0], [0.8], [1.6], [2.4], [3.2]], dtype=np.float32)
    ids = np.arange(5, dtype=np.int64)
    clusters, _, _ = leader_clusters(ids, lambda b: x[b], _exact_range_search(x, ids), 1.0)
    assert [g.tolist() for g in clusters] == [[0, 1, 2], [3, 4]]  # no chaining


def _reference_leaders(x: np.ndarray, radius: float, min_size: int) -> list[list[int]]:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    near = [set(np.flatnonzero(row <= radius).tolist()) for row in d]
    order = sorted(range(len(x)), key=lambda i: (-(len(near[i]) - 1), i))
    taken: set[int] = set()
    clusters = []
    for leader in order:
        if leader in taken:
            continue
        members = {leader} | (near[leader] - taken)
        if len(members) >= min_size:
            taken |= members
            clusters.append(sorted(members))
    return sorted(clusters, key=lambda c: (-len(c), c[0]))


@pytest.mark.parametrize("min_size", [1, 2, 4])
def test_leader_clusters_equal_the_plain_greedy_reference(min_size: int) -> None:
    x = _planted(n=200, dim=2, seed=1)
    ids = np.arange(len(x), dtype=np.int64)
    clusters, _, _ = leader_clusters(
        ids, lambda b: x[b], _exact_range_search(x, ids), 0.4, min_size=min_size, batch_size=13
    )
    assert [c.tolist() for c in clusters] == _reference_leaders(x, 0.4, min_size)


def test_union_find_merges_and_compresses() -> None:
    sets = UnionFind(6)
    sets.union_pairs(np.array([0, 2, 4]), np.array([1, 3, 5]))
    sets.union_pairs(np.array([1]), np.array([3]))
    assert sets.components().tolist() == [0, 0, 0, 0, 4, 4]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.5", True])
def test_bad_thresholds_are_refused(bad: object) -> None:
    with pytest.raises(UserError, match="threshold must be"):
        check_threshold(bad, 0.5)  # type: ignore[arg-type]


def test_no_threshold_anywhere_is_refused() -> None:
    with pytest.raises(UserError, match="no validated verification threshold"):
        check_threshold(None, None)
    assert check_threshold(None, 0.25) == 0.25
    assert check_threshold(0.0, 0.25) == 0.0


def _groups(paths: list[list[str]]) -> Groups:
    ids = [[i * 10 + j for j in range(len(g))] for i, g in enumerate(paths)]
    return Groups("duplicates", 0.5, "euclidean", 20, ids, paths, 30, 4)


def test_write_groups_is_atomic_and_refuses_foreign_folders(tmp_path: Path) -> None:
    from PIL import Image

    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(path)
        images.append(str(path))
    out = tmp_path / "out"
    write_groups(_groups([images[:2], [images[2], str(tmp_path / "missing.png")]]), out)
    rows = (out / "groups.csv").read_text().splitlines()
    assert rows[0] == "group,id,path" and rows[1] == f"1,0,{images[0]}" and len(rows) == 5
    document = json.loads((out / "groups.json").read_text())
    assert document["groups"][0] == images[:2] and document["ids"][0] == [0, 1]
    page = (out / "index.html").read_text()
    assert page.count("<section") == 2 and 'src="thumbnails/0.jpg"' in page
    assert "(unreadable)" in page  # the missing file: shown by name, no thumbnail
    assert sorted(p.name for p in (out / "thumbnails").iterdir()) == [
        "0.jpg",
        "1.jpg",
        "10.jpg",
    ]
    assert all(src.startswith("thumbnails/") for src in re.findall(r'src="([^"]*)"', page))
    # a previous output is replaced; no staging folders are left
    write_groups(_groups([images[:1] * 2]), out)
    assert len((out / "groups.csv").read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        write_groups(_groups([images[:2]]), foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a folder"):
        check_output_folder(tmp_path / "img0.png")


# ---------------------------------------------------------------------------------------------
# on a real catalog: mbdl dedup / mbdl cluster


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("faiss")
    from catalog_fixtures import make_tiny_catalog

    return make_tiny_catalog(tmp_path_factory.mktemp("dedup"))


def _csv_groups(folder: Path) -> list[set[str]]:
    groups: dict[str, set[str]] = {}
    for line in (folder / "groups.csv").read_text().splitlines()[1:]:
        number, _, path = line.split(",", 2)
        groups.setdefault(number, set()).add(Path(path).name)
    return list(groups.values())


def test_dedup_finds_the_planted_copies(tiny, tmp_path: Path, capsys) -> None:
    from catalog_fixtures import PLANTED
    from mbdl.catalog import Catalog
    from mbdl.catalog.dedup import find_duplicates
    from mbdl.cli import main

    catalog = Catalog.open(tiny.index)
    assert catalog.threshold is not None
    out = tmp_path / "dups"
    assert main(["dedup", str(tiny.index), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    found = _csv_groups(out)
    for original, copy in PLANTED:
        assert any({original, copy} <= group for group in found), (original, found)
    groups = find_duplicates(catalog)
    assert [set(Path(p).name for p in g) for g in groups.paths] == found
    assert f"examined {groups.pairs_examined} pairs" in printed
    assert groups.pairs_examined < len(catalog) ** 2
    # every pair within a group chain is within the threshold of some other member
    for ids in groups.groups:
        x = catalog.vectors(ids)
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) + np.eye(len(ids)) * 9
        assert (d.min(axis=1) <= catalog.threshold + 1e-4).all()
    # a folder of images with --model: indexed into a temporary catalog first, same groups
    again = tmp_path / "from-folder"
    assert (
        main(
            [
                "dedup",
                str(tiny.images),
                "--model",
                str(tiny.model),
                "-o",
                str(again),
                "--no-progress",
            ]
        )
        == 0
    )
    assert _csv_groups(again) == found


def test_cluster_writes_leader_clusters(tiny, tmp_path: Path) -> None:
    from mbdl.catalog import Catalog
    from mbdl.catalog.dedup import cluster_catalog
    from mbdl.cli import main

    catalog = Catalog.open(tiny.index)
    threshold = 2 * catalog.threshold
    out = tmp_path / "clusters"
    assert (
        main(
            [
                "cluster",
                str(tiny.index),
                "-o",
                str(out),
                "--threshold",
                str(threshold),
                "--min-size",
                "2",
            ]
        )
        == 0
    )
    clusters = cluster_catalog(catalog, threshold)
    assert [set(Path(p).name for p in g) for g in clusters.paths] == _csv_groups(out)
    seen = [i for group in clusters.groups for i in group]
    assert len(seen) == len(set(seen))  # an item is in one cluster at most
    for ids in clusters.groups:  # some member (the leader) is within threshold of all
        x = catalog.vectors(ids)
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        assert (d.max(axis=1) <= threshold + 1e-4).any()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["dedup", "INDEX", "--threshold", "-0.5"], "threshold must be a finite distance"),
        (["dedup", "INDEX", "--threshold", "nan"], "threshold must be a finite distance"),
        (["cluster", "INDEX", "--threshold", "inf"], "threshold must be a finite distance"),
        (["dedup", "DIR"], "give --model MODEL"),
        (["cluster", "DIR"], "give --model MODEL"),
        (["dedup", "FILE"], "is not an index or a folder"),
        (["dedup", "INDEX", "-o", "FOREIGN"], "not empty"),
        (["cluster", "INDEX", "--min-size", "0"], "min_size must be"),
    ],
)
def test_bad_dedup_input_is_one_line_exit_2(
    tiny, tmp_path: Path, capsys, arguments: list[str], message: str
) -> None:
    from mbdl.cli import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    names = {
        "INDEX": str(tiny.index),
        "DIR": str(tiny.images),
        "FOREIGN": str(foreign),
        "FILE": str(foreign / "keep.txt"),
    }
    words = [names.get(word, word) for word in arguments]
    if "-o" not in words:
        words += ["-o", str(tmp_path / "out")]
    assert main(words) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (foreign / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()
