"""docs/deploy.md runs top to bottom: its ``mbdl`` commands and Python blocks, in page order, in
one empty folder (pages marked ``<!-- docs-test: sequential -->`` are run here, not by
test_docs's per-page Python runner)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from mbdl.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "deploy.md"
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of the page's fenced blocks, in order."""
    return [(m.group("lang"), m.group("body")) for m in FENCE.finditer(text)]


def test_the_page_is_marked_sequential() -> None:
    assert "<!-- docs-test: sequential -->" in PAGE.read_text(encoding="utf-8")


def test_deploy_page_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tensorboard")
    pytest.importorskip("faiss")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__docs__"}
    commands = 0
    try:
        for number, (lang, body) in enumerate(blocks(PAGE.read_text(encoding="utf-8")), 1):
            if lang == "python":
                exec(compile(body, f"docs/deploy.md[block {number}]", "exec"), namespace)
            elif lang == "bash":
                for line in body.strip().splitlines():
                    words = shlex.split(line)
                    assert words[0] == "mbdl", f"block {number}: only mbdl commands here: {line}"
                    one_thread = ["train.num_threads=1"] if words[1] == "train" else []
                    assert main([*words[1:], *one_thread]) == 0, line
                    commands += 1
            elif lang == "text":  # shown, not run: torchrun lines must at least parse
                for line in body.strip().splitlines():
                    if line.startswith("torchrun "):
                        words = shlex.split(line)
                        build_parser().parse_args(words[words.index("mbdl") + 1 :])
    finally:
        torch.set_num_threads(threads)
    assert commands >= 8
    assert "max |export - PyTorch|" in capsys.readouterr().out
