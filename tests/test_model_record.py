"""The model record (:mod:`mbdl.model`): one typed record read from checkpoints and model
directories, every stored field checked; the inference library under the commands reads images
through the one checked reader and embeds any split with the evaluation transform."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import mbdl
from fixtures_data import make_folder
from mbdl.cli import main
from mbdl.config import config_to_dict, load_config
from mbdl.model import ModelRecord, load_model, read_record
from mbdl.model.checkpoint import VERSION, load_checkpoint, save_checkpoint
from mbdl.models import build_model

VERIFICATION = {"threshold": 0.7, "far": 0.01, "distance": "euclidean", "chosen_on": "validation"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``best.pt`` of an untrained small CNN (3 channels, 8 dimensions, 32 px) whose config
    names a folder of 6 classes, with a verification threshold."""
    tmp = tmp_path_factory.mktemp("record")
    root = make_folder(tmp / "images", num_classes=6, per_class=3)
    config = load_config(
        None,
        [
            "data.source=folder",
            f"data.root={root}",
            "data.val_fraction=0",
            "data.image_size=32",
            "model.backbone=smallcnn",
            "model.embedding_dim=8",
            "eval.ks=[1]",
        ],
    )
    torch.manual_seed(0)
    model = build_model("smallcnn", 8, in_channels=3)
    path = tmp / "best.pt"
    save_checkpoint(
        path,
        {
            "kind": "best",
            "config": config_to_dict(config),
            "model_args": {"backbone": "smallcnn", "embedding_dim": 8, "in_channels": 3},
            "data_args": {"source": "folder", "root": str(root), "image_size": 32, "channels": 3},
            "model_state": model.state_dict(),
            "epoch": 0,
            "validation": {"map@r": 0.25},
            "verification": dict(VERIFICATION),
        },
    )
    return path


@pytest.fixture(scope="module")
def model_dir(checkpoint: Path) -> Path:
    from mbdl.export import save_pretrained

    return save_pretrained(checkpoint, checkpoint.parent / "model")


# -- the record ---------------------------------------------------------------------------------


def test_the_record_round_trips_through_checkpoints_and_model_directories(
    checkpoint: Path, model_dir: Path
) -> None:
    state = load_checkpoint(checkpoint)
    assert state["version"] == VERSION == 2
    assert state["preprocessing"]["crop"] == 32 and state["distance"] == "euclidean"
    from_checkpoint = read_record(checkpoint)
    from_dir = read_record(model_dir)
    assert isinstance(from_checkpoint, ModelRecord)
    assert from_checkpoint.stored_fields() == from_dir.stored_fields() | {
        "mbdl_version": from_checkpoint.provenance.mbdl_version
    }
    assert from_checkpoint.embedding_dim == 8 and from_checkpoint.in_channels == 3
    assert from_checkpoint.image_size == 32 and from_checkpoint.color_mode == "RGB"
    assert from_checkpoint.verification is not None
    assert from_checkpoint.verification.threshold == 0.7
    assert from_checkpoint.verification.threshold_for("euclidean") == 0.7
    assert from_dir.provenance.validation == {"map@r": 0.25}
    assert from_dir.provenance.source == str(model_dir)
    # the top-level names
    assert mbdl.read_record(model_dir) == from_dir
    loaded = mbdl.load_model(model_dir)
    assert loaded.record == from_dir
    image = Image.new("RGB", (40, 36), (10, 200, 30))
    with torch.inference_mode():
        assert loaded.module(loaded.transform(image)[None]).shape == (1, 8)


def test_a_version_1_checkpoint_still_loads(checkpoint: Path, tmp_path: Path) -> None:
    """The layout of tests/fixtures/checkpoint_v1_layout.json: no preprocessing, distance or
    mbdl_version; the record derives them as mbdl did then."""
    fixture = Path(__file__).parent / "fixtures" / "checkpoint_v1_layout.json"
    v1_keys = set(json.loads(fixture.read_text(encoding="utf-8"))["best"])
    state = load_checkpoint(checkpoint)
    old = {k: v for k, v in state.items() if k in v1_keys}
    old["version"] = 1
    assert "preprocessing" not in old and "distance" not in old
    target = tmp_path / "v1.pt"
    torch.save(old, target)  # as written by mbdl 1: no record fields
    record = load_model(target).record
    assert record.provenance.mbdl_version is None  # not recorded then
    assert record.stored_fields() == read_record(checkpoint).stored_fields() | {
        "mbdl_version": None
    }
    # a squared-euclidean model of version 1 reads its distance from the stored config
    old["config"]["eval"]["distance"] = "squared_euclidean"
    torch.save(old, target)
    assert read_record(target).distance == "squared_euclidean"


def test_the_threshold_converts_between_distances_only_when_exact() -> None:
    from mbdl.model.record import check_verification

    squared = check_verification({"threshold": 0.49, "distance": "squared_euclidean"}, "x")
    assert squared is not None and squared.threshold_for("euclidean") == pytest.approx(0.7)
    with pytest.raises(ValueError, match="cosine distance"):
        check_verification({"threshold": 0.3, "distance": "cosine"}, "x").threshold_for(  # type: ignore[union-attr]
            "euclidean"
        )


# -- every stored field checked: one line, exit 2 ------------------------------------------------


def _edit_model_dir(model_dir: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    import shutil

    target = tmp_path / "edited"
    shutil.copytree(model_dir, target)
    info = json.loads((target / "config.json").read_text(encoding="utf-8"))
    replaced = edit(info)
    text = replaced if isinstance(replaced, str) else json.dumps(info)
    (target / "config.json").write_text(text, encoding="utf-8")
    return target


def _set(section: str | None, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(info: dict[str, Any]) -> None:
        (info if section is None else info[section])[key] = value

    return edit


def _drop(section: str | None, key: str) -> Callable[[dict[str, Any]], None]:
    def edit(info: dict[str, Any]) -> None:
        (info if section is None else info[section]).pop(key)

    return edit


def _grey_record(info: dict[str, Any]) -> None:
    """A record consistent in itself (1 channel everywhere) over weights for 3 channels."""
    info["model_args"]["in_channels"] = 1
    info["data_args"]["channels"] = 1
    info["preprocessing"].update(color_mode="L", channels=1, mean=[0.0], std=[1.0])


MODEL_DIR_CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "missing-model_args": (_drop(None, "model_args"), r"no model_args"),
    "string-version": (_set(None, "version", "1"), r"version must be an integer"),
    "float-version": (_set(None, "version", 1.5), r"version must be an integer"),
    "list-data_args": (_set(None, "data_args", [1, 2]), r"data_args must be a mapping"),
    "string-preprocessing": (_set(None, "preprocessing", "x"), r"preprocessing must be a mapping"),
    "list-training_config": (_set(None, "training_config", [1]), r"training_config must be"),
    "missing-crop": (_drop("preprocessing", "crop"), r"preprocessing has no 'crop'"),
    "huge-crop": (_set("preprocessing", "crop", 10**9), r"preprocessing\.crop 1000000000 is out"),
    "huge-resize": (_set("preprocessing", "resize", 10**9), r"preprocessing\.resize 1000000000"),
    "huge-image_size": (_set("data_args", "image_size", 10**9), r"data_args\.image_size 10+ is"),
    "nan-mean": (
        _set("preprocessing", "mean", [math.nan, 0, 0]),
        r"preprocessing\.mean must be fi",
    ),
    "inf-std": (_set("preprocessing", "std", [1, math.inf, 1]), r"preprocessing\.std must be fini"),
    "zero-std": (_set("preprocessing", "std", [1, 0, 1]), r"preprocessing\.std must be > 0"),
    "mean-per-channel": (_set("preprocessing", "mean", [0.5]), r"mean has 1 values for 3 channels"),
    "grey-preprocessing": (_set("preprocessing", "color_mode", "L"), r"color_mode L disagrees"),
    "channels-disagree": (_set("data_args", "channels", 1), r"channels 1 disagrees with .* 3"),
    "in_channels-5": (_set("model_args", "in_channels", 5), r"in_channels must be 1 or 3"),
    "nan-threshold": (_set("verification", "threshold", math.nan), r"threshold must be finite"),
    "inf-threshold": (_set("verification", "threshold", math.inf), r"threshold must be finite"),
    "negative-threshold": (_set("verification", "threshold", -0.5), r"threshold must be >= 0"),
    "unknown-distance": (_set(None, "distance", "manhattan"), r"distance must be one of"),
    "grey-record-of-colour-weights": (_grey_record, r"model_state does not match the model"),
    "deep-nesting": (lambda info: "[" * 100_000 + "]" * 100_000, r"nests deeper than"),
    "deep-nesting-in-a-field": (
        _set(None, "training_config", json.loads("[" * 50 + "]" * 50)),
        r"nests deeper than|training_config must be",
    ),
}


@pytest.mark.parametrize("case", list(MODEL_DIR_CASES), ids=list(MODEL_DIR_CASES))
def test_a_malformed_model_directory_field_is_one_line(
    case: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, message = MODEL_DIR_CASES[case]
    target = _edit_model_dir(model_dir, tmp_path, edit)
    image = str(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    code = main(["verify", str(target), image, image, "--threshold", "0.5", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert __import__("re").search(message, err), err


CHECKPOINT_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "nan-threshold": (_set("verification", "threshold", math.nan), r"threshold must be finite"),
    "negative-threshold": (_set("verification", "threshold", -1.0), r"threshold must be >= 0"),
    "inf-std": (_set("preprocessing", "std", [math.inf] * 3), r"preprocessing\.std must be fini"),
    "huge-crop": (_set("preprocessing", "crop", 10**9), r"preprocessing\.crop 1000000000"),
    "channels-disagree": (_set("data_args", "channels", 1), r"channels 1 disagrees"),
    "version-string": (_set(None, "version", "2"), r"version must be an integer"),
    "missing-model_args": (_drop(None, "model_args"), r"edited\.pt: no model_args"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES), ids=list(CHECKPOINT_CASES))
def test_a_malformed_checkpoint_field_is_one_line(
    case: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, message = CHECKPOINT_CASES[case]
    state = load_checkpoint(checkpoint)
    edit(state)
    target = tmp_path / "edited.pt"
    torch.save(state, target)  # as a hostile writer would: no checks on the way out
    code = main(["export", str(target), "--format", "safetensors", "-o", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "m").exists()


def test_json_is_read_within_bounds(tmp_path: Path) -> None:
    from mbdl.fileio import read_json_bounded

    path = tmp_path / "x.json"
    path.write_text(json.dumps({"a": list(range(100))}))
    assert read_json_bounded(path)["a"][-1] == 99
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        read_json_bounded(path, max_bytes=100)
    with pytest.raises(ValueError, match="holds more than 50 values"):
        read_json_bounded(path, max_items=50)
    path.write_text("[" * 40 + "]" * 40)
    with pytest.raises(ValueError, match="nests deeper than 32 levels"):
        read_json_bounded(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_json_bounded(path)
    path.write_text('{"a": [1, 2')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json_bounded(path)


# -- the library under the commands ---------------------------------------------------------------


def _copies(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A grey 8-bit PNG and pixel-exact copies in other formats and bit depths."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (37, 41), dtype=np.uint8)
    original = tmp_path / "grey.png"
    Image.fromarray(grey, "L").save(original)
    copies = []
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # I;16: the same image, 16-bit
    copies.append(tmp_path / "grey16.png")
    sixteen.save(copies[-1])
    alpha = Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=-1), "LA")
    copies.append(tmp_path / "grey_alpha.png")
    alpha.save(copies[-1])
    for suffix in (".tif", ".bmp"):
        copies.append(tmp_path / f"grey{suffix}")
        Image.fromarray(grey, "L").save(copies[-1])
    rgb = Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    copies.append(tmp_path / "grey_rgb.png")
    rgb.save(copies[-1])
    rgba = Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], axis=-1), "RGBA")
    copies.append(tmp_path / "grey_rgba.tif")
    rgba.save(copies[-1])
    return original, copies


def test_verify_and_embed_read_every_format_alike(model_dir: Path, tmp_path: Path) -> None:
    """The same pixels give the same embedding whatever the file's format, bit depth or opaque
    alpha channel (the 16-bit copy is scaled, not clipped; opaque alpha composites to itself)."""
    original, copies = _copies(tmp_path)
    model = mbdl.load_model(model_dir)
    embeddings = mbdl.embed_images(model, [original, *copies])
    for path, embedding in zip(copies, embeddings[1:], strict=True):
        assert torch.equal(embedding, embeddings[0]), path.name
        answer = mbdl.verify(model, original, path)
        assert answer.same and answer.distance == 0.0, path.name
        assert answer.threshold == 0.7 and answer.threshold_source == "validation classes"


def test_embed_images_embeds_in_bounded_batches(model_dir: Path, tmp_path: Path) -> None:
    """``mbdl.embed_images`` reads and embeds ``batch_size`` images at a time (the network never
    sees more), with the same embeddings, in the same order, as one batch."""
    original, copies = _copies(tmp_path)
    images = [original, *copies, *reversed(copies)]
    model = mbdl.load_model(model_dir)
    seen: list[int] = []
    hook = model.module.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
    try:
        whole = mbdl.embed_images(model, images, batch_size=len(images))
        seen.clear()
        batched = mbdl.embed_images(model, images, batch_size=3)
    finally:
        hook.remove()
    assert seen == [3] * (len(images) // 3) + ([len(images) % 3] if len(images) % 3 else [])
    assert torch.allclose(batched, whole, atol=1e-6)
    assert mbdl.embed_images(model, [], batch_size=3).shape == (0, whole.shape[1])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        mbdl.embed_images(model, images, batch_size=0)


def test_verify_command_prints_the_answer(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original, copies = _copies(tmp_path)
    assert main(["verify", str(model_dir), str(original), str(copies[0]), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["same"] is True and answer["distance"] == 0.0 and answer["far"] == 0.01
    assert main(["verify", str(model_dir), str(original), str(copies[0]), "--threshold", "-1"]) == 2
    assert "threshold must be a finite distance >= 0" in capsys.readouterr().err


def test_embedding_the_training_split_uses_the_evaluation_transform(checkpoint: Path) -> None:
    model = mbdl.load_model(checkpoint)
    first = mbdl.embed(model, split="train")
    second = mbdl.embed(model, split="train")
    assert first.embeddings.shape == (len(first.items), 8)
    assert torch.equal(first.embeddings, second.embeddings)  # no random augmentation


def test_evaluate_model_separates_metrics_from_their_metadata(checkpoint: Path) -> None:
    result = mbdl.evaluate_model(checkpoint, split="test", device="cpu")
    assert "map@r" in result.metrics and "tar@threshold" in result.metrics
    assert not any(k.startswith("kmeans/") or k.endswith("_pairs") for k in result.metrics)
    assert result.meta["kmeans/backend"] == "torch"
    assert isinstance(result.meta["genuine_pairs"], int) and result.meta["genuine_pairs"] > 0
