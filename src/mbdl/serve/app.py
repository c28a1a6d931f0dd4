"""The HTTP service of a catalog: a JSON API and a small search page (FastAPI on uvicorn).

Endpoints (every error is a 4xx with a JSON body ``{"error": "..."}``):

- ``POST /search``: an image as a multipart file (form fields or query parameters ``k`` and
  ``threshold``), or a JSON body ``{"embedding": [...] | [[...], ...], "k": 5, "threshold": ...}``;
  answers a list of :meth:`QueryResult.to_json`, the shape ``mbdl search --json`` prints.
  ``threshold`` is a distance, ``"model"`` (the model's validated threshold) or absent.
- ``GET /health``, ``GET /info`` (model, dim, distance, count, threshold, factory).
- ``GET /thumbnail/{id}``: a JPEG thumbnail of the catalog item ``id`` (an integer; nothing else
  is ever read from disk).
- ``GET /``: the search page (plain HTML and JavaScript, works offline).

Uploads larger than ``max_upload_bytes`` are refused with 413 before they are read whole, images
of more than ``max_pixels`` pixels with 400 before they are decoded. With ``token``, every
endpoint but ``/`` and ``/health`` needs ``Authorization: Bearer <token>`` (401 otherwise).
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (the
# ``Request`` imported inside create_app) at definition time

import hmac
import io
import json
import math
import os
import sys
import threading
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mbdl.data.files import read_image
from mbdl.errors import UserError, one_line
from mbdl.serve.page import PAGE

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
MAX_K = 1000
MAX_QUERIES = 1000
THUMBNAIL_SIZE = 160
OPEN_PATHS = ("/", "/health")


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def require_fastapi() -> Any:
    """The ``fastapi`` module, or a one-line error naming the extra to install."""
    try:
        import fastapi
        import python_multipart  # noqa: F401  (python-multipart, for uploads)
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"mbdl serve needs FastAPI, uvicorn and python-multipart ({error.name} is missing): "
            "pip install 'mbdl[serve]'"
        ) from None
    return fastapi


def parse_k(value: Any) -> int:
    """``k`` from a JSON value or a form/query string: an integer in ``1..MAX_K``."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise RequestError(400, f"k must be an integer, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise RequestError(400, f"k must be an integer from 1 to {MAX_K}, got {value!r}")
    return value


def parse_threshold(value: Any, model_threshold: float | None) -> float | str | None:
    """``None``, ``"model"`` (only when the model has a threshold) or a finite distance >= 0."""
    if value is None or value == "":
        return None
    if value == "model":
        if model_threshold is None:
            raise RequestError(400, "threshold 'model': the model has no validated threshold")
        return "model"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RequestError(400, "threshold must be a number or 'model'") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, "threshold must be a number or 'model'")
    if not math.isfinite(value) or value < 0:
        raise RequestError(400, f"threshold must be a finite distance >= 0, got {value}")
    return float(value)


def parse_embeddings(value: Any, dim: int) -> np.ndarray:
    """A JSON ``embedding`` (one vector or a list of vectors) as float32 ``[Q, dim]``."""
    if not isinstance(value, list) or not value:
        raise RequestError(400, "embedding must be a non-empty list of numbers (or of lists)")
    rows = value if isinstance(value[0], list) else [value]
    if len(rows) > MAX_QUERIES:
        raise RequestError(400, f"at most {MAX_QUERIES} embeddings per request")
    for row in rows:
        if not isinstance(row, list) or len(row) != dim:
            size = len(row) if isinstance(row, list) else "a non-list"
            raise RequestError(
                400, f"embedding must have {dim} numbers (the catalog's), got {size}"
            )
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in row):
            raise RequestError(400, "embedding must hold numbers only")
    array = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(array).all():
        raise RequestError(400, "embedding must be finite (no NaN or infinity)")
    return array.astype(np.float32)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The uploaded bytes as an RGB image; not an image, or more than ``max_pixels`` pixels
    (checked from the header before decoding): :class:`RequestError` 400."""
    if not data:
        raise RequestError(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestError(
                        400,
                        f"the image has {width} x {height} pixels, more than the limit of "
                        f"{max_pixels}",
                    )
                image.load()
                return image.convert("RGB")
    except UnidentifiedImageError:
        raise RequestError(400, "the uploaded file is not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise RequestError(400, f"cannot decode the uploaded image: {one_line(error)}") from None
    except Image.DecompressionBombWarning as warning:
        raise RequestError(400, f"the image is too large: {one_line(warning)}") from None


class Thumbnails:
    """JPEG thumbnails of catalog items by id, the most recent ``capacity`` kept in memory.
    Only the catalog's own paths are read, and only while their size is the indexed one."""

    def __init__(self, catalog: Any, capacity: int = 512) -> None:
        self.catalog = catalog
        self.capacity = capacity
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, item_id: int) -> bytes:
        with self.lock:
            if item_id in self.cache:
                self.cache.move_to_end(item_id)
                return self.cache[item_id]
        try:
            items = self.catalog.items([item_id])
        except (UserError, KeyError, IndexError, ValueError):
            items = []
        if not items:
            raise RequestError(404, f"no catalog item with id {item_id}")
        item = items[0]
        try:
            if os.stat(item.path).st_size != item.size:
                raise RequestError(404, f"item {item_id}'s file changed since it was indexed")
            image = read_image(item.path, "RGB")
        except (UserError, OSError):
            raise RequestError(404, f"item {item_id}'s image cannot be read") from None
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self.lock:
            self.cache[item_id] = data
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return data


def parse_item_id(text: str) -> int:
    """A thumbnail's id: ASCII digits only (no signs, dots, slashes or encodings)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise RequestError(400, "an item id is a non-negative integer")
    return int(text)


def catalog_info(searcher: Any) -> dict[str, Any]:
    catalog = searcher.catalog
    return {
        "model": str(catalog.model),
        "dim": int(searcher.dim),
        "distance": catalog.distance,
        "count": len(catalog),
        "threshold": searcher.threshold,
        "factory": catalog.factory,
    }


def create_app(
    searcher: Any,
    *,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Any:
    """The FastAPI application serving ``searcher`` (a :class:`mbdl.catalog.Searcher`)."""
    fastapi = require_fastapi()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    if token is not None and not token.strip():
        raise UserError("the token must not be empty")
    app = fastapi.FastAPI(title="mbdl catalog search", docs_url=None, redoc_url=None)
    thumbnails = Thumbnails(searcher.catalog)
    info = catalog_info(searcher)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Any:
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Any:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        return error(400, "invalid request")

    @app.middleware("http")
    async def _authorize(request: Request, call_next: Any) -> Any:
        if token is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error(
                    401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
                )
        return await call_next(request)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "invalid Content-Length")
            if int(declared) > max_upload_bytes:
                raise RequestError(413, f"the upload is larger than {max_upload_bytes} bytes")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_upload_bytes:
                raise RequestError(413, f"the upload is larger than {max_upload_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_form(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except HTTPException as exc:
            raise RequestError(400, f"malformed multipart upload: {exc.detail}") from None
        except Exception as exc:  # the multipart parser's own errors
            raise RequestError(400, f"malformed multipart upload: {one_line(exc)}") from None
        files = [value for value in form.values() if not isinstance(value, str)]
        if len(files) != 1:
            raise RequestError(400, "send exactly one image file (multipart field 'image')")
        data = await files[0].read()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        return data, fields

    def run_search(queries: Any, k: int, threshold: Any) -> list[dict[str, Any]]:
        try:
            results = searcher.search(queries, k=k, threshold=threshold)
        except UserError as exc:
            raise RequestError(400, one_line(exc)) from None
        return [result.to_json() for result in results]

    @app.get("/", response_class=HTMLResponse)
    async def page() -> Any:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "count": info["count"]}

    @app.get("/info")
    async def get_info() -> Any:
        return info

    @app.get("/thumbnail/{item_id}")
    async def thumbnail(item_id: str) -> Any:
        data = await run_in_threadpool(thumbnails.get, parse_item_id(item_id))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/search")
    async def search(request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request)
        if content_type == "multipart/form-data":
            data, fields = await parse_form(request, body)
            params = {**request.query_params, **fields}
            k = parse_k(params.get("k", "5"))
            threshold = parse_threshold(params.get("threshold"), searcher.threshold)
            image = await run_in_threadpool(decode_image, data, max_pixels)
            return await run_in_threadpool(run_search, [image], k, threshold)
        if content_type == "application/json":
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise RequestError(400, "the body is not valid JSON") from None
            if not isinstance(document, dict) or "embedding" not in document:
                raise RequestError(400, "a JSON body needs an 'embedding' (a list of numbers)")
            unknown = set(document) - {"embedding", "k", "threshold"}
            if unknown:
                raise RequestError(400, f"unknown keys: {', '.join(sorted(unknown))[:200]}")
            embeddings = parse_embeddings(document["embedding"], int(searcher.dim))
            k = parse_k(document.get("k", 5))
            threshold = parse_threshold(document.get("threshold"), searcher.threshold)
            return await run_in_threadpool(run_search, embeddings, k, threshold)
        raise RequestError(
            415, "send an image as multipart/form-data or an embedding as application/json"
        )

    return app


def serve(
    index: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "cpu",
) -> None:
    """Open the catalog ``index`` and serve it until interrupted."""
    require_fastapi()
    import uvicorn

    from mbdl.catalog import Searcher

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"port must be an integer from 0 to 65535, got {port!r}")
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"mbdl serve: warning: listening on {host} without --token: anyone who can reach "
            "this address can search the catalog and see its thumbnails",
            file=sys.stderr,
        )
    searcher = Searcher.open(index, device=device)
    app = create_app(
        searcher, token=token, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
