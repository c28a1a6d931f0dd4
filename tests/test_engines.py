"""``mbdl index export`` to Qdrant (qdrant-client's local mode) and Milvus (Milvus Lite), and
``search_engine`` answering from there: the same neighbours and distances as the catalog's exact
search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from catalog_fixtures import TinyCatalog, make_tiny_catalog
from mbdl.catalog import Catalog, Searcher
from mbdl.catalog.engines import export_catalog, parse_engine, search_engine
from mbdl.cli import main
from mbdl.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCatalog:
    return make_tiny_catalog(tmp_path_factory.mktemp("engines"))


def _engine_location(engine: str, root: Path) -> str:
    if engine == "qdrant":
        pytest.importorskip("qdrant_client")
        return f"qdrant:{root / 'qdrant'}"
    pytest.importorskip("pymilvus")
    try:
        from pymilvus import MilvusClient

        MilvusClient(str(root / "probe.db")).close()
    except Exception as error:  # milvus-lite missing or unable to start here
        pytest.skip(f"Milvus Lite cannot start here: {error}")
    return f"milvus:{root / 'milvus.db'}"


@pytest.mark.parametrize("engine", ["qdrant", "milvus"])
def test_export_then_engine_search_equals_exact_search(
    engine: str, tiny: TinyCatalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    location = _engine_location(engine, tmp_path)
    assert main(["index", "export", str(tiny.index), "--to", location, "--collection", "c1"]) == 0
    assert "exported" in capsys.readouterr().out
    searcher = Searcher.open(tiny.index)
    catalog = searcher.catalog
    queries = catalog.vectors(catalog.ids()[:6]) + 0.01  # near, not on, catalog items
    got = search_engine(location, "c1", queries, k=5, threshold=0.2)
    expected = searcher.search(queries, k=5, threshold=0.2)
    for mine, exact in zip(got, expected, strict=True):
        assert [n.id for n in mine.neighbours] == [n.id for n in exact.neighbours]
        assert [n.path for n in mine.neighbours] == [n.path for n in exact.neighbours]
        assert [n.match for n in mine.neighbours] == [n.match for n in exact.neighbours]
        np.testing.assert_allclose(
            [n.distance for n in mine.neighbours],
            [n.distance for n in exact.neighbours],
            atol=2e-3,
        )
    # a second export into the same collection is refused; --replace replaces it
    assert main(["index", "export", str(tiny.index), "--to", location, "--collection", "c1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "index",
                "export",
                str(tiny.index),
                "--to",
                location,
                "--collection",
                "c1",
                "--replace",
            ]
        )
        == 0
    )


def test_engine_search_from_the_cli(tiny: TinyCatalog, tmp_path: Path, capsys) -> None:
    location = _engine_location("qdrant", tmp_path)
    export_catalog(Catalog.open(tiny.index), location, collection="mbdl")
    query = next(tiny.images.rglob("00003.png"))
    assert main(["search", str(tiny.index), str(query), "--engine", location, "--json"]) == 0
    import json

    results = json.loads(capsys.readouterr().out)
    assert results[0]["neighbours"][0]["path"] == str(query.resolve())


def test_bad_engine_input_is_refused(tiny: TinyCatalog, tmp_path: Path) -> None:
    for spec in ("redis:x", "qdrant:", "qdrant", ""):
        with pytest.raises(UserError, match="ENGINE:LOCATION"):
            parse_engine(spec)
    location = _engine_location("qdrant", tmp_path)
    export_catalog(Catalog.open(tiny.index), location, collection="ok")
    with pytest.raises(UserError, match="no collection"):
        search_engine(location, "missing", np.zeros((1, 16), np.float32), k=1)
    with pytest.raises(UserError, match="dimension"):
        search_engine(location, "ok", np.zeros((1, 7), np.float32), k=1)
    with pytest.raises(UserError, match="finite"):
        search_engine(location, "ok", np.full((1, 16), np.nan, np.float32), k=1)
    with pytest.raises(UserError, match="k must be"):
        search_engine(location, "ok", np.zeros((1, 16), np.float32), k=0)
    with pytest.raises(UserError, match="collection name"):
        export_catalog(Catalog.open(tiny.index), location, collection="../x")
