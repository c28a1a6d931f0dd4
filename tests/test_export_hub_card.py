"""``mbdl export --push-to-hub REPO`` (a stubbed HfApi) and the model card's Hub metadata."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fixtures_data import TINY_GLYPH_RUN
from mbdl.cli import main
from mbdl.export import card_metadata

SMALL = TINY_GLYPH_RUN


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hubcard") / "run"
    assert main(["train", *SMALL, f"out={out}"]) == 0
    return out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_pushes_the_model_directory(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = pytest.importorskip("huggingface_hub")
    uploads: list[tuple] = []

    class Api:
        def __init__(self, token: str | None = None) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs: object) -> None:
            uploads.append(("create", repo_id, kwargs.get("private")))

        def upload_folder(self, folder_path: str, repo_id: str) -> str:
            uploads.append(("upload", repo_id, sorted(os.listdir(folder_path))))
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(hub, "HfApi", Api)
    target = tmp_path / "model"
    args = ["export", str(run_dir), "--format", "safetensors", "-o", str(target)]
    assert main([*args, "--push-to-hub", "me/glyphs", "--private"]) == 0
    assert uploads == [
        ("create", "me/glyphs", True),
        (
            "upload",
            "me/glyphs",
            ["README.md", "config.json", "model.safetensors", "preprocessing.json"],
        ),
    ]
    meta = front_matter((target / "README.md").read_text())
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["library_name"] == "mbdl" and meta["license"] == "other"
    (result,) = [r for r in meta["model-index"][0]["results"] if "test" in r["dataset"]["name"]]
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert 0 <= values["map@r"] <= 1


def test_push_to_hub_needs_a_model_directory(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", str(run_dir), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]
    assert main([*args, "--push-to-hub", "me/x"]) == 2
    assert "--format safetensors" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_card_metadata_names_the_base_model_and_dataset() -> None:
    info = {
        "model_args": {"backbone": "hf/facebook/dinov2-small"},
        "training_config": {
            "data": {"source": "hf", "root": "my-org/products"},
            "model": {"pretrained": "DEFAULT"},
        },
        "license": "apache-2.0",
        "test": {"map@r": 0.25, "recall@1": 0.5},
    }
    meta = card_metadata(info)
    assert meta["base_model"] == "facebook/dinov2-small"
    assert meta["datasets"] == ["my-org/products"] and meta["license"] == "apache-2.0"
    timm = card_metadata(
        {
            "model_args": {"backbone": "timm/convnext_tiny"},
            "training_config": {"model": {"pretrained": "DEFAULT"}},
        }
    )
    assert timm["base_model"] == "timm/convnext_tiny" and "model-index" not in timm
