"""The trust boundary for received files: a checkpoint or a model directory is data.

Whatever spelling its stored config uses (nested sections, flat dotted keys, both at once, in a
``.pt`` checkpoint's ``config`` or a model directory's ``training_config``), no command imports
or calls the code it names unless ``MBDL_TRUST_PLUGINS=1``. The planted module records its own
import and any call in a marker file; every command must refuse in one line, exit 2, and leave
the marker absent.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mbdl.cli import main
from mbdl.train.checkpoint import load_checkpoint, save_checkpoint

SMALL = [
    "data.max_classes=24",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.batch_classes=4",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=1",
    "train.device=cpu",
    "train.num_threads=1",
    "eval.ks=[1]",
    "eval.report=false",
]

PLANTED = "mbdl_planted_payload"

#: (the key, the planted value) of each registry-backed config key
PLANTED_KEYS = {
    "data.source": f"{PLANTED}:load_splits",
    "loss.name": f"{PLANTED}:Loss",
    "model.backbone": f"{PLANTED}:build",
}


def _spellings(key: str, value: str) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """Ways a stored config can name ``value`` at ``key``, each a function of the clean config."""
    section, _, sub = key.partition(".")

    def nested(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, section: {**config[section], sub: value}}

    def flat_beside_nested(config: dict[str, Any]) -> dict[str, Any]:
        return {**config, key: value}  # the nested section keeps its clean value

    def flat_only(config: dict[str, Any]) -> dict[str, Any]:
        flat = {
            f"{s}.{k}": v for s, m in config.items() if isinstance(m, dict) for k, v in m.items()
        }
        rest = {k: v for k, v in config.items() if not isinstance(v, dict)}
        return {**rest, **flat, key: value}

    return {"nested": nested, "flat-beside-nested": flat_beside_nested, "flat-only": flat_only}


CASES = [
    (key, spelling) for key, value in PLANTED_KEYS.items() for spelling in _spellings(key, value)
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    run = root / "run"
    assert main(["train", f"out={run}", *SMALL]) == 0
    model_dir = root / "model"
    assert main(["export", str(run), "--format", "safetensors", "-o", str(model_dir)]) == 0
    image = root / "query.png"
    Image.new("L", (32, 32), 90).save(image)
    return {"run": run, "model": model_dir, "image": image}


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module that writes a marker file when imported or called; importable, untrusted."""
    marker = tmp_path / "PAYLOAD_RAN"
    package = tmp_path / "planted"
    package.mkdir()
    (package / f"{PLANTED}.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            Path({str(marker)!r}).write_text("imported")
            def load_splits(*args, **kwargs):
                Path({str(marker)!r}).write_text("called")
            def build(*args, **kwargs):
                Path({str(marker)!r}).write_text("called")
            class Loss:
                def __init__(self, *args, **kwargs):
                    Path({str(marker)!r}).write_text("called")
            """
        )
    )
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delenv("MBDL_TRUST_PLUGINS", raising=False)
    monkeypatch.delitem(sys.modules, PLANTED, raising=False)
    return marker


def _planted_checkpoint(trained: dict[str, Path], tmp_path: Path, key: str, spelling: str) -> Path:
    state = load_checkpoint(trained["run"] / "checkpoints" / "best.pt")
    state["config"] = _spellings(key, PLANTED_KEYS[key])[spelling](state["config"])
    path = tmp_path / "received.pt"
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    return path


def _planted_model_dir(trained: dict[str, Path], tmp_path: Path, key: str, spelling: str) -> Path:
    target = tmp_path / "received-model"
    target.mkdir()
    for file in trained["model"].iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    info = json.loads((target / "config.json").read_text())
    info["training_config"] = _spellings(key, PLANTED_KEYS[key])[spelling](info["training_config"])
    (target / "config.json").write_text(json.dumps(info))
    return target


def _commands(model: Path, image: Path, out: Path) -> dict[str, list[str]]:
    return {
        "eval": ["eval", str(model)],
        "embed-npz": ["embed", str(model), "-o", str(out / "e.npz")],
        "embed-npy": ["embed", str(model), "-o", str(out / "e.npy"), "--no-progress"],
        "embed-images": [
            "embed",
            str(model),
            "--images",
            str(image.parent),
            "-o",
            str(out / "i.npy"),
            "--no-progress",
        ],
        "search": ["search", str(model), str(image)],
        "verify": ["verify", str(model), str(image), str(image)],
        "index": ["index", "build", str(model), "-o", str(out / "index")],
        "export": ["export", str(model), "--format", "torchscript", "-o", str(out / "m.pt")],
    }


@pytest.mark.parametrize(("key", "spelling"), CASES)
@pytest.mark.parametrize("container", ["checkpoint", "model-directory"])
def test_no_command_runs_code_named_by_a_received_file(
    trained: dict[str, Path],
    planted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    spelling: str,
    container: str,
) -> None:
    make = _planted_checkpoint if container == "checkpoint" else _planted_model_dir
    received = make(trained, tmp_path, key, spelling)
    out = tmp_path / "out"
    out.mkdir()
    for name, argv in _commands(received, trained["image"], out).items():
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert not planted.exists(), f"{name}: the received file ran code ({key}, {spelling})"
        assert PLANTED not in sys.modules, f"{name}: the received file imported a module"
        assert code == 2, f"{name}: exit {code}, {err}"
        assert len(err.splitlines()) == 1 and "MBDL_TRUST_PLUGINS=1" in err, (name, err)
        assert key in err, (name, err)
    assert sorted(p.name for p in out.iterdir()) == [], "a refused command wrote output"


def test_trusted_files_still_load_their_plugins(
    trained: dict[str, Path], planted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal above is the trust rule, not a broken loader: trusted, the same file imports
    the module it names (and the planted source runs)."""
    received = _planted_checkpoint(trained, tmp_path, "data.source", "flat-beside-nested")
    monkeypatch.setenv("MBDL_TRUST_PLUGINS", "1")
    main(["eval", str(received)])
    assert planted.exists()


def test_a_stored_config_that_is_not_a_mapping_is_refused(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = load_checkpoint(trained["run"] / "checkpoints" / "best.pt")
    for bad in (["data.source", "x"], {"data": "glyphs"}, {1: "x"}):
        state["config"] = bad
        path = tmp_path / "bad.pt"
        save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
        assert main(["eval", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config" in err, err
