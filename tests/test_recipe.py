"""``model.backbone=auto``: the recipe chosen from the data and the weights at hand (mbdl.recipe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mbdl.cli import main
from mbdl.config import load_config
from mbdl.recipe import (
    MAX_SECONDS,
    MIN_STEPS,
    PASSES,
    DataSummary,
    RecipeError,
    WeightsFound,
    choose_recipe,
    find_weights,
    images_per_second,
    weight_file_names,
)

MOBILENET = "/weights/mobilenet_v2-b0353104.pth"


def summary(**changes: object) -> DataSummary:
    values: dict[str, object] = {
        "source": "folder",
        "train_images": 2000,
        "train_classes": 100,
        "images_per_class": 20.0,
        "median_side": 128,
        "colour": "colour",
    }
    values.update(changes)
    return DataSummary(**values)  # type: ignore[arg-type]


WEIGHTS = WeightsFound({"mobilenet_v2": MOBILENET})


def images_seen(values: dict[str, object]) -> int:
    batch = int(values["train.batch_classes"]) * int(values["train.batch_per_class"])  # type: ignore[call-overload]
    return int(values["train.epochs"]) * int(values["train.max_steps_per_epoch"]) * batch  # type: ignore[call-overload]


# -- the choice (pure) --------------------------------------------------------------------------


def test_colour_images_with_weights_fine_tune_the_pretrained_network() -> None:
    recipe = choose_recipe(summary(), WEIGHTS)
    v = recipe.values
    assert recipe.kind == "pretrained"
    assert v["model.backbone"] == "mobilenet_v2" and v["model.pretrained"] == MOBILENET
    assert v["model.freeze_bn"] is True and v["train.head_lr_mult"] == 10.0
    assert v["data.image_size"] == 64 and v["data.augment"] == "affine"
    assert v["train.batch_classes"] * v["train.batch_per_class"] == 64
    assert any("mobilenet_v2 fine-tuned" in r for r in recipe.reasons)
    assert "mobilenet_v2 (ImageNet weights), 64 px" in recipe.describe()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"colour": "grey", "colour_fraction": 0.0}, "grey images (RGB filters summed) of 128 px"),
        ({"median_side": 28}, "colour images of 28 px, upscaled to 64 px"),
        ({"median_side": 50}, "colour images of 50 px, upscaled to 64 px"),
        ({"median_side": None}, "of unknown size, upscaled to 64 px"),
        ({"colour": "mixed", "colour_fraction": 0.3}, "mixed colour and grey images (30%"),
    ],
)
def test_grey_small_or_unsized_images_also_fine_tune_the_pretrained_network_at_64_px(
    changes: dict[str, object], reason: str
) -> None:
    recipe = choose_recipe(summary(**changes), WEIGHTS)
    assert recipe.kind == "pretrained" and recipe.values["model.backbone"] == "mobilenet_v2"
    assert recipe.values["data.image_size"] == 64 and recipe.values["model.freeze_bn"] is True
    assert reason in recipe.describe()


def test_without_weights_the_small_cnn_from_scratch_with_the_reason() -> None:
    recipe = choose_recipe(summary(colour="grey", median_side=28), WeightsFound())
    assert recipe.kind == "scratch"
    assert recipe.values["model.backbone"] == "smallvgg"
    assert recipe.values["data.image_size"] == 32 and "model.pretrained" not in recipe.values
    assert "no pretrained weights found" in recipe.describe()


def test_a_small_input_size_the_user_set_trains_from_scratch() -> None:
    recipe = choose_recipe(summary(), WEIGHTS, {"data.image_size": 16})
    assert recipe.kind == "scratch" and "data.image_size=16 < 48 px" in recipe.describe()
    assert "data.image_size" not in recipe.values


def test_weights_the_user_named_are_used_even_at_a_small_input_size() -> None:
    user = {"model.pretrained": MOBILENET, "data.image_size": 32}
    recipe = choose_recipe(summary(), WEIGHTS, user)
    assert recipe.kind == "pretrained" and recipe.values["model.backbone"] == "mobilenet_v2"
    assert "data.image_size=32 < 48 px, but model.pretrained names mobilenet_v2's weights" in (
        recipe.describe()
    )
    assert "upscaled" not in recipe.describe()  # the user's size, not the recipe's


def test_mostly_colour_mixed_images_are_treated_as_colour_and_say_so() -> None:
    recipe = choose_recipe(summary(colour="mixed", colour_fraction=0.7), WEIGHTS)
    assert recipe.kind == "pretrained"
    assert "mixed colour and grey images (70% of those sampled have colour)" in recipe.describe()


def test_weights_found_but_rejected_are_reported() -> None:
    found = WeightsFound({}, ("/cache/mobilenet_v2-b0353104.pth not used: it does not fit",))
    recipe = choose_recipe(summary(), found)
    assert recipe.kind == "scratch"  # a fall back, with the reason printed
    assert "not used: it does not fit" in recipe.describe()


def test_keys_the_user_set_are_kept_and_the_choice_follows_them() -> None:
    user = {"data.image_size": 160, "train.batch_classes": 8, "model.embedding_dim": 32}
    recipe = choose_recipe(summary(), WEIGHTS, user)
    assert not set(user) & set(recipe.values)
    assert recipe.values["data.augment"] == "crop"  # follows the user's 160 px
    assert recipe.values["train.batch_per_class"] == 8  # 64 images with the user's P = 8


def test_a_budget_the_user_set_is_the_users_and_the_eta_counts_it() -> None:
    user = {"train.epochs": 3, "train.max_steps_per_epoch": 7}
    recipe = choose_recipe(summary(), WEIGHTS, user)
    assert "train.epochs" not in recipe.values and "train.max_steps_per_epoch" not in recipe.values
    speed = images_per_second("mobilenet_v2", 64)
    assert speed is not None and recipe.estimated_seconds == pytest.approx(3 * 7 * 64 / speed)
    full_passes = choose_recipe(summary(), WEIGHTS, {"train.epochs": 3})  # 2000 // 64 steps each
    assert full_passes.estimated_seconds == pytest.approx(3 * 31 * 64 / speed)


def test_the_eta_follows_the_threads_training_will_use() -> None:
    """The speed table is for 2 CPU threads: one thread halves the estimated speed (doubles the
    ETA of the same budget), four double it; a GPU ignores the thread count."""
    budget = {"train.epochs": 3, "train.max_steps_per_epoch": 7}
    two = choose_recipe(summary(), WEIGHTS, budget).estimated_seconds
    one = choose_recipe(summary(threads=1), WEIGHTS, budget).estimated_seconds
    four = choose_recipe(summary(threads=4), WEIGHTS, budget).estimated_seconds
    assert two is not None and one == pytest.approx(2 * two) and four == pytest.approx(two / 2)
    assert images_per_second("mobilenet_v2", 64, "cuda", threads=1) == images_per_second(
        "mobilenet_v2", 64, "cuda", threads=8
    )


def test_glyphs_keep_the_default_recipe() -> None:
    recipe = choose_recipe(summary(source="glyphs", colour="grey", median_side=32), WEIGHTS)
    assert recipe.values == {"model.backbone": "smallvgg"}


def test_the_gpu_prefers_resnet50_at_the_images_size() -> None:
    weights = WeightsFound({"mobilenet_v2": MOBILENET, "resnet50": "/w/resnet50.pth"})
    recipe = choose_recipe(summary(device="cuda", median_side=300), weights)
    assert recipe.values["model.backbone"] == "resnet50"
    assert recipe.values["data.image_size"] == 224 and recipe.values["data.augment"] == "crop"


def test_a_fixed_size_source_is_upscaled_for_the_pretrained_network_else_keeps_its_size() -> None:
    fashion = summary(source="idx", colour="grey", fixed_size=True, median_side=28)
    recipe = choose_recipe(fashion, WEIGHTS)
    assert (
        recipe.values["data.image_size"] == 64 and recipe.values["model.backbone"] == "mobilenet_v2"
    )
    scratch = choose_recipe(fashion, WeightsFound())
    assert (
        "data.image_size" not in scratch.values and scratch.values["model.backbone"] == "smallvgg"
    )


# -- the budget by images seen ----------------------------------------------------------------


def test_the_budget_is_passes_over_the_training_images() -> None:
    recipe = choose_recipe(summary(train_images=8000, train_classes=400), WEIGHTS)
    seen = images_seen(recipe.values)
    assert PASSES["pretrained"] * 8000 <= seen < PASSES["pretrained"] * 8000 * 1.1
    assert recipe.values["train.epochs"] >= 10


def test_a_small_folder_gets_at_least_the_minimum_steps() -> None:
    recipe = choose_recipe(
        summary(train_images=300, train_classes=30, images_per_class=10), WEIGHTS
    )
    steps = recipe.values["train.epochs"] * recipe.values["train.max_steps_per_epoch"]
    assert MIN_STEPS["pretrained"] <= steps < MIN_STEPS["pretrained"] * 1.1
    assert "at least" in recipe.describe()


def test_a_large_folder_is_capped_in_time_and_the_eta_says_so() -> None:
    recipe = choose_recipe(summary(train_images=2_000_000, train_classes=20_000), WEIGHTS)
    speed = images_per_second("mobilenet_v2", 64)
    assert speed is not None and recipe.estimated_seconds is not None
    assert images_seen(recipe.values) / speed <= MAX_SECONDS * 1.1
    assert "capped" in recipe.describe() and "training ETA ~" in recipe.describe()


def test_few_images_per_class_limit_k_and_few_classes_raise_k() -> None:
    few = choose_recipe(summary(train_classes=3, images_per_class=300), WeightsFound())
    assert few.values["train.batch_classes"] == 3 and few.values["train.batch_per_class"] == 32
    small = choose_recipe(summary(images_per_class=3), WEIGHTS)
    assert small.values["train.batch_per_class"] == 3


def test_a_split_without_two_classes_is_refused() -> None:
    with pytest.raises(RecipeError, match="1 class"):
        choose_recipe(summary(train_classes=1), WEIGHTS)


# -- weights on this machine --------------------------------------------------------------------


def _save_state(path: Path, backbone: str) -> Path:
    from mbdl.models.backbones import BUILTIN_BACKBONES

    torch.save(BUILTIN_BACKBONES[backbone].network(3, False).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's MobileNetV2 file name holding random MobileNetV2 weights."""
    folder = tmp_path_factory.mktemp("hub")
    _save_state(folder / weight_file_names()["mobilenet_v2"], "mobilenet_v2")
    return folder


def test_weights_in_a_cache_folder_are_found(weights_dir: Path) -> None:
    found = find_weights(None, [weights_dir])
    assert found.files == {"mobilenet_v2": str(weights_dir / "mobilenet_v2-b0353104.pth")}
    assert found.rejected == ()


def test_weights_that_do_not_fit_or_do_not_load_are_rejected(tmp_path: Path) -> None:
    names = weight_file_names()
    _save_state(tmp_path / names["mobilenet_v2"], "smallcnn")  # the name lies
    (tmp_path / names["resnet18"]).write_bytes(b"not a checkpoint")
    found = find_weights(None, [tmp_path])
    assert found.files == {}
    assert any("does not fit mobilenet_v2" in r for r in found.rejected)
    assert any(names["resnet18"] in r for r in found.rejected)


def test_a_named_weights_file_gives_the_backbones_it_fits(tmp_path: Path) -> None:
    path = _save_state(tmp_path / "mine.pth", "resnet18")
    assert find_weights(str(path)).files == {"resnet18": str(path)}
    _save_state(tmp_path / "small.pth", "smallcnn")
    torch.save({"x": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(RecipeError, match="fits no built-in backbone"):
        find_weights(str(tmp_path / "other.pth"))


# -- the command line -----------------------------------------------------------------------------


def _folder(root: Path, side: int, *, colour: bool, classes: int = 8, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            (image if colour else image.convert("L")).save(root / f"c{c}" / f"{k}.png")
    return root


def test_the_default_backbone_is_auto() -> None:
    config = load_config(None, ["data.source=folder", "data.root=/x"])
    assert config.model.backbone == "auto"
    assert config.user_set == frozenset({"data.source", "data.root"})


def test_glyphs_resolve_to_exactly_the_default_recipe() -> None:
    from mbdl.config import config_to_flat
    from mbdl.recipe import resolve_auto

    auto = load_config(None, ["data.max_classes=24"])
    assert resolve_auto(auto) is None  # the glyphs then load exactly as before
    assert auto.recipe.kind == "default"
    named = load_config(None, ["data.max_classes=24", "model.backbone=smallvgg"])
    assert config_to_flat(auto) == config_to_flat(named)


def test_a_fixed_size_grey_source_is_resolved_and_loaded_at_64_px(
    tmp_path: Path, weights_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fixtures_data import make_idx
    from mbdl.recipe import resolve_auto

    monkeypatch.setattr("mbdl.recipe.weight_folders", lambda: [weights_dir])
    make_idx(tmp_path / "fashion", per_class=(4, 2))
    config = load_config(None, ["data.source=idx", f"data.root={tmp_path / 'fashion'}"])
    splits = resolve_auto(config)
    assert config.model.backbone == "mobilenet_v2" and config.data.image_size == 64
    assert splits is not None and splits.image_size == 64 and splits.channels == 1
    image, _ = splits.train[0]
    assert tuple(image.shape) == (1, 64, 64)  # 28 px upscaled by the attached transform
    assert "grey images (RGB filters summed) of 28 px, upscaled to 64 px" in splits.info["recipe"]


def test_print_config_shows_the_resolved_recipe(
    tmp_path: Path,
    weights_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("mbdl.recipe.weight_folders", lambda: [weights_dir])
    root = _folder(tmp_path / "photos", 80, colour=True)
    assert main(["train", "--print-config", "data.source=folder", f"data.root={root}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# auto: mobilenet_v2 (ImageNet weights), 64 px")
    config = yaml.safe_load(out)
    assert config["model"]["backbone"] == "mobilenet_v2"
    assert config["model"]["pretrained"] == str(weights_dir / "mobilenet_v2-b0353104.pth")
    assert config["model"]["freeze_bn"] is True and config["data"]["image_size"] == 64
    assert config["train"]["max_steps_per_epoch"] is not None

    grey = _folder(tmp_path / "scans", 40, colour=False)
    args = ["train", "--print-config", "data.source=folder", f"data.root={grey}", "train.lr=0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "grey images (RGB filters summed) of 40 px, upscaled to 64 px" in out.splitlines()[0]
    config = yaml.safe_load(out)
    assert config["model"]["backbone"] == "mobilenet_v2" and config["data"]["image_size"] == 64
    assert config["train"]["lr"] == 0.01  # set by the user: kept

    monkeypatch.setattr("mbdl.recipe.weight_folders", lambda: [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no pretrained weights found" in out.splitlines()[0]
    config = yaml.safe_load(out)
    assert config["model"]["backbone"] == "smallvgg" and config["data"]["image_size"] == 32
    assert config["train"]["lr"] == 0.01  # set by the user: kept


@pytest.mark.parametrize(
    ("per_class", "extra", "message"),
    [
        (1, [], "every training class has one image"),
        (3, ["train.batch_classes=6"], "train.batch_classes=6 but the training split has only 3"),
    ],
)
def test_a_folder_too_small_is_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    per_class: int,
    extra: list[str],
    message: str,
) -> None:
    root = _folder(tmp_path / "tiny", 40, colour=True, classes=6, per_class=per_class)
    args = ["data.source=folder", f"data.root={root}", "data.val_fraction=0", *extra]
    code = main(["train", *args, f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "model.backbone=auto" in err and message in err
    assert not (tmp_path / "run").exists()  # stopped before the run directory


def test_a_refused_choice_is_raised_by_choose_recipe() -> None:
    with pytest.raises(RecipeError, match="one image"):
        choose_recipe(summary(largest_class=1), WEIGHTS)


def test_training_prints_and_records_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("mbdl.recipe.weight_folders", lambda: [])
    root = _folder(tmp_path / "data", 24, colour=True, classes=8, per_class=3)
    args = [
        "train",
        "data.source=folder",
        f"data.root={root}",
        "data.val_fraction=0",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "model.embedding_dim=8",
        "eval.report=false",
        f"out={tmp_path / 'run'}",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("data folder"))
    assert "auto: smallvgg (from scratch), 32 px" in line
    assert "no pretrained weights found" in line
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "smallvgg" and saved["data"]["image_size"] == 32
    assert saved["model"]["embedding_dim"] == 8 and saved["train"]["epochs"] == 1  # the user's
    assert saved["train"]["batch_classes"] == 4  # the 4 training classes
