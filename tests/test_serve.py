"""``mbdl serve``: the JSON API over real HTTP (uvicorn on a free localhost port), every bad
request a 4xx with a JSON error, thumbnails only by catalog id; the page in headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from catalog_fixtures import TinyCatalog, make_tiny_catalog  # noqa: E402
from mbdl.serve import create_app  # noqa: E402

DIM = 16  # the tiny model's embedding_dim
V = [0.1] * DIM


class Server:
    """uvicorn serving ``app`` in a thread on a free 127.0.0.1 port."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def raw(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        """A request with ``path`` sent exactly as written (no client-side normalisation)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        if body or method == "POST":
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body or None)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, response.getheader("content-type", ""), data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCatalog:
    pytest.importorskip("faiss")
    tiny = make_tiny_catalog(tmp_path_factory.mktemp("serve"))
    (tiny.images / "secret.txt").write_text("not in the catalog")
    return tiny


@pytest.fixture(scope="module")
def catalog_images(tiny: TinyCatalog) -> list[Path]:
    return sorted(p.resolve() for p in tiny.images.rglob("*.png"))


@pytest.fixture(scope="module")
def searcher(tiny: TinyCatalog) -> Any:
    from mbdl.catalog import Searcher

    return Searcher.open(tiny.index)


@pytest.fixture(scope="module")
def server(searcher: Any) -> Iterator[Server]:
    running = Server(create_app(searcher, max_upload_bytes=200_000, max_pixels=1_000_000))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def guarded(searcher: Any) -> Iterator[Server]:
    running = Server(create_app(searcher, token="s3cret"))
    yield running
    running.stop()


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


def test_health_and_info(server: Server, searcher: Any) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    info = httpx.get(f"{server.url}/info").json()
    assert info["count"] == len(searcher.catalog) and info["dim"] == searcher.dim
    assert info["distance"] == searcher.catalog.distance
    assert info["threshold"] == searcher.threshold
    assert set(info) == {"model", "dim", "distance", "count", "threshold", "factory"}


def test_image_upload_returns_the_search_json(
    server: Server, searcher: Any, catalog_images: list[Path]
) -> None:
    data = catalog_images[2].read_bytes()
    response = httpx.post(
        f"{server.url}/search",
        files={"image": ("query.png", data, "image/png")},
        data={"k": "3", "threshold": "model"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = searcher.search(
        [Image.open(io.BytesIO(data)).convert("RGB")], k=3, threshold="model"
    )
    assert body == [r.to_json() for r in expected]
    first = body[0]["neighbours"][0]
    assert first["path"] == str(catalog_images[2]) and first["match"] is True
    assert len(body[0]["neighbours"]) == 3


def test_embedding_body_returns_the_search_json(server: Server, searcher: Any) -> None:
    queries = np.eye(searcher.dim, dtype=np.float32)[:2]
    response = httpx.post(f"{server.url}/search", json={"embedding": queries.tolist(), "k": 2})
    assert response.status_code == 200, response.text
    assert response.json() == [r.to_json() for r in searcher.search(queries, k=2)]
    single = httpx.post(f"{server.url}/search", json={"embedding": queries[0].tolist()})
    assert single.json()[0]["neighbours"][:2] == response.json()[0]["neighbours"]
    assert len(single.json()[0]["neighbours"]) == 5  # the default k


def test_thumbnails_by_id_only(server: Server, searcher: Any, catalog_images: list[Path]) -> None:
    response = httpx.get(f"{server.url}/thumbnail/1")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = np.asarray(Image.open(io.BytesIO(response.content)).convert("L"), np.float32)
    item = searcher.catalog.items([1])[0]
    original = np.asarray(Image.open(item.path).convert("L"), np.float32)
    assert image.shape == original.shape  # at most 160 px on the longer side, never enlarged
    assert np.abs(image - original).mean() < 6  # the item's own picture (JPEG)
    assert_json_error(httpx.get(f"{server.url}/thumbnail/999"), 404)
    secret = str(catalog_images[0].parent / "secret.txt")
    tricks = [
        "/thumbnail/../../etc/passwd",
        "/thumbnail/..%2F..%2Fetc%2Fpasswd",
        "/thumbnail/%2Fetc%2Fpasswd",
        "/thumbnail/" + secret.replace("/", "%2F"),
        "/thumbnail/" + secret,
        "/thumbnail/-1",
        "/thumbnail/1.0",
        "/thumbnail/%31",  # an encoded digit is decoded to "1" by the router: allowed
        "/thumbnail/1%00",
        "/thumbnail/",
        "/../../etc/passwd",
        "/thumbnail/99999999999999999999999",
    ]
    for trick in tricks:
        status, content_type, body = server.raw("GET", trick)
        if trick == "/thumbnail/%31":
            assert status == 200
            continue
        assert status in (400, 404), (trick, status)
        assert content_type.startswith("application/json"), trick
        assert b"not in the catalog" not in body and b"root:" not in body
        assert json.loads(body)["error"]


def test_oversized_uploads_are_413(server: Server) -> None:
    big = b"\0" * 300_000
    message = assert_json_error(
        httpx.post(f"{server.url}/search", files={"image": ("a.png", big, "image/png")}), 413
    )
    assert "200000" in message

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b"x" * 10_000

    response = httpx.post(
        f"{server.url}/search",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=zzz"},
    )
    assert_json_error(response, 413)


@pytest.mark.parametrize(
    "body",
    [
        b'--zzz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nabc',
        b"not multipart at all",
        b"--zzz--\r\n",
    ],
)
def test_malformed_multipart_is_400(server: Server, body: bytes) -> None:
    response = httpx.post(
        f"{server.url}/search",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=zzz"},
    )
    assert_json_error(response, 400)


def test_bad_images_are_400(server: Server) -> None:
    for name, data in [
        ("a.txt", b"hello, not an image"),
        ("empty.png", b""),
        ("cut.png", png((64, 64), (1, 2, 3))[:60]),
    ]:
        response = httpx.post(f"{server.url}/search", files={"image": (name, data, "image/png")})
        assert_json_error(response, 400)
    huge = png((2000, 1000), (9, 9, 9))  # 2 Mpx, compresses to a few kB
    assert len(huge) < 200_000
    message = assert_json_error(
        httpx.post(f"{server.url}/search", files={"image": ("huge.png", huge, "image/png")}), 400
    )
    assert "2000 x 1000" in message


@pytest.mark.parametrize(
    "document",
    [
        {"embedding": [0.1, 0.2]},
        {"embedding": [V, [0.1]]},
        {"embedding": []},
        {"embedding": "0.1,0.2,0.3"},
        {"embedding": V, "k": 0},
        {"embedding": V, "k": -3},
        {"embedding": V, "k": 10**9},
        {"embedding": V, "k": "five"},
        {"embedding": V, "k": 2.5},
        {"embedding": V, "k": True},
        {"embedding": V, "threshold": -1},
        {"embedding": V, "threshold": "loose"},
        {"embedding": V, "extra": 1},
        {"vector": V},
        {"embedding": [*V[:-1], True]},
        {"embedding": [*V[:-1], "x"]},
    ],
)
def test_bad_json_bodies_are_400(server: Server, document: dict) -> None:
    assert_json_error(httpx.post(f"{server.url}/search", json=document), 400)


def test_nan_and_broken_json_are_400(server: Server) -> None:
    for text in [
        '{"embedding": [NaN, 0.1, 0.2]}',
        '{"embedding": [Infinity, 0, 0]}',
        '{"embedding": [0.1, 0.2',
        "[1, 2, 3]",
    ]:
        response = httpx.post(
            f"{server.url}/search", content=text, headers={"content-type": "application/json"}
        )
        assert "nan" not in assert_json_error(response, 400).lower() or "finite" in response.text


def test_bad_k_in_a_form_is_400(server: Server) -> None:
    for k in ("0", "x", "1001", "-1"):
        response = httpx.post(
            f"{server.url}/search",
            files={"image": ("q.png", png((8, 8), (1, 2, 3)), "image/png")},
            data={"k": k},
        )
        assert_json_error(response, 400)


def test_other_requests_are_json_4xx(server: Server) -> None:
    assert_json_error(httpx.get(f"{server.url}/nowhere"), 404)
    assert_json_error(httpx.get(f"{server.url}/search"), 405)
    assert_json_error(httpx.post(f"{server.url}/search", content=b"x"), 415)


def test_token_is_required_when_set(guarded: Server) -> None:
    url = guarded.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/").status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Bearer s3cretX"},
    ):
        for method, path in (("GET", "/info"), ("GET", "/thumbnail/0"), ("POST", "/search")):
            response = httpx.request(method, f"{url}{path}", headers=headers, json={})
            assert_json_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{url}/info", headers=good).status_code == 200
    assert httpx.get(f"{url}/thumbnail/0", headers=good).status_code == 200


def test_bad_limits_are_refused(searcher: Any) -> None:
    from mbdl.errors import UserError

    with pytest.raises(UserError, match="max_upload_bytes"):
        create_app(searcher, max_upload_bytes=0)
    with pytest.raises(UserError, match="max_pixels"):
        create_app(searcher, max_pixels=-5)
    with pytest.raises(UserError, match="token"):
        create_app(searcher, token=" ")


@pytest.mark.chromium
def test_page_finds_the_nearest_item_in_headless_chromium(
    server: Server, catalog_images: list[Path], tmp_path: Path
) -> None:
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "headless Chromium is not installed (Debian packages chromium, chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=driver_path)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(lambda b: "items" in b.find_element(By.ID, "info").text)
        query = tmp_path / "query.png"  # a copy of a catalog image, outside the catalog
        query.write_bytes(catalog_images[3].read_bytes())
        browser.find_element(By.ID, "file").send_keys(str(query))
        WebDriverWait(browser, 30).until(
            lambda b: b.find_element(By.ID, "results").get_attribute("data-done") == "1"
        )
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
        assert len(cards) == 8  # the page's default k
        assert cards[0].get_attribute("data-path") == str(catalog_images[3])
        loaded = browser.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".map(i => i.complete && i.naturalWidth)"
        )
        assert all(width == 32 for width in loaded), loaded  # every thumbnail decoded
        assert "distance 0.0" in cards[0].text
        keep = os.environ.get("MBDL_SCREENSHOTS")  # a folder to keep the screenshot in, to look at
        browser.save_screenshot(str(Path(keep or tmp_path) / "serve-page.png"))
    finally:
        browser.quit()


def test_missing_fastapi_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mbdl.cli import main
    from mbdl.errors import UserError
    from mbdl.serve.app import require_fastapi

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    with pytest.raises(UserError, match=r"pip install 'mbdl\[serve\]'"):
        require_fastapi()
    assert main(["serve", "nowhere.index"]) == 2


def test_serve_refuses_a_bad_port_or_index_in_one_line(
    tiny: TinyCatalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbdl.cli import main

    assert main(["serve", str(tiny.index), "--port", "70000"]) == 2
    assert "port must be" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an mbdl index" in err


def test_concurrent_requests_get_the_serial_answers(
    server: Server, catalog_images: list[Path]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def ask(path: Path) -> Any:
        files = {"image": ("q.png", path.read_bytes(), "image/png")}
        response = httpx.post(f"{server.url}/search", files=files, data={"k": "4"}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    queries = catalog_images[:8]
    serial = [ask(path) for path in queries]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, queries))
    assert concurrent == serial
    assert [r[0]["neighbours"][0]["path"] for r in serial] == [str(p) for p in queries]
