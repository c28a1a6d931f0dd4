"""Serve a catalog over HTTP: :func:`create_app` builds the FastAPI application (JSON API and
search page), :func:`serve` runs it on uvicorn. Needs ``pip install 'mbdl[serve]'``."""

from mbdl.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
