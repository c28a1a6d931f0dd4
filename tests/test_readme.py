"""The README's Python code blocks run as written; its `mbdl train` commands are valid."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mbdl.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def code_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_first_two_commands_install_then_train_and_test() -> None:
    first, second = code_blocks("bash")[:2]
    assert first.strip().endswith("pip install -e . && mbdl train")
    assert second.strip().endswith('pip install -e ".[dev]" && python -m pytest')


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_block_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MBDL_CACHE", str(tmp_path / "cache"))
    source = code_blocks("python")[index]
    exec(compile(source, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every block prints its result


def train_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("mbdl train "):
                commands.append(shlex.split(line)[2:])
    return commands


@pytest.mark.parametrize("args", train_commands(), ids=" ".join)
def test_train_commands_are_valid(
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(README.parent)
    if "resume=true" in args:  # continues a run: give it the saved config of one
        assert main(["train", "--print-config", "loss.name=triplet"]) == 0
        config = tmp_path / "config.yaml"
        config.write_text(capsys.readouterr().out)
        args = [str(config) if a.endswith("config.yaml") else a for a in args]
    assert main(["train", "--print-config", *args]) == 0, capsys.readouterr().err
