"""docs/catalog.md runs top to bottom: its ``mbdl`` commands and Python blocks, in page order, in
one empty folder (the mechanism of tests/test_deploy_docs.py). ``mbdl serve`` runs as a
subprocess on a free localhost port (the page's ``8000`` is replaced by it) until the end."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mbdl.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "catalog.md"
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group("lang"), m.group("body")) for m in FENCE.finditer(text)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(words: list[str], port: int) -> subprocess.Popen:
    words = [str(port) if w == "8000" else w for w in words]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mbdl", *words[1:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mbdl serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError("mbdl serve did not answer /health within 120 s")


def test_the_page_is_marked_sequential() -> None:
    assert "<!-- docs-test: sequential -->" in PAGE.read_text(encoding="utf-8")


def test_catalog_page_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    pytest.importorskip("qdrant_client")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__docs__"}
    port = _free_port()
    server = None
    commands = []
    try:
        for number, (lang, body) in enumerate(blocks(PAGE.read_text(encoding="utf-8")), 1):
            if lang == "python":
                code = body.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                exec(compile(code, f"docs/catalog.md[block {number}]", "exec"), namespace)
            elif lang == "bash":
                for line in body.strip().splitlines():
                    words = shlex.split(line)
                    assert words[0] == "mbdl", f"block {number}: only mbdl commands here: {line}"
                    commands.append(words[1])
                    if words[1] == "serve":
                        server = _start_server(words, port)
                        continue
                    one_thread = ["train.num_threads=1"] if words[1] == "train" else []
                    assert main([*words[1:], *one_thread]) == 0, line
    finally:
        torch.set_num_threads(threads)
        if server is not None:
            server.terminate()
            server.wait(30)
    for needed in ("train", "export", "index", "search", "dedup", "cluster", "serve"):
        assert needed in commands
    out = capsys.readouterr().out
    assert "pairs examined" in out and "groups of near-duplicates" in out
    assert (tmp_path / "duplicates" / "index.html").is_file()
