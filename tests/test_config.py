"""Config: schema, YAML files, dotted overrides, validation messages."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from mbdl.config import (
    CONFIG_SCHEMA,
    RESUME_FREE_KEYS,
    SECTIONS,
    UPPER_BOUNDS,
    Config,
    ConfigError,
    Key,
    config_differences,
    config_to_dict,
    config_to_flat,
    config_to_yaml,
    load_config,
    loss_parameters,
    parse_override,
)
from mbdl.losses import LOSSES

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_glyphs_mdl_recipe() -> None:
    config = load_config()
    assert isinstance(config, Config)
    assert config.data.source == "glyphs"
    # auto resolves to smallvgg on glyphs, the rest of the defaults unchanged (test_recipe)
    assert config.model.backbone == "auto" and config.model.embedding_dim == 64
    assert config.loss.name == "mdl" and config.loss.params == loss_parameters("mdl")
    assert config.loss.params["margin"] == 0.2
    assert (config.train.batch_classes, config.train.batch_per_class) == (32, 4)
    assert config.train.optimizer == "adamw" and config.train.lr == 1e-3
    assert config.train.select_metric == "map@r"
    flat = config_to_flat(config)
    for key, declared in CONFIG_SCHEMA.items():
        assert flat[key] == declared.default, key


def test_schema_is_plain_data() -> None:
    for key, declared in CONFIG_SCHEMA.items():
        assert isinstance(declared, Key)
        assert declared.type.removesuffix(" | None") in {
            "str",
            "int",
            "int | str",
            "float",
            "bool",
            "list[int]",
            "list[float]",
            "list[str]",
        }
        assert isinstance(declared.help, str) and declared.help
        allowed, default = declared.choices, declared.default
        if allowed is not None and isinstance(default, list):
            assert set(default) <= set(allowed), key
        elif allowed is not None:
            assert default in allowed, key
        # every default passes its own validation
        load_config(None, [f"{key}={yaml.safe_dump(default, default_flow_style=True).strip()}"])


def test_each_key_is_declared_once_as_a_dataclass_field() -> None:
    """The schema, the defaults, the bounds and the resume-free keys are one declaration: the
    fields of Config's sections (plus the top-level keys), in their order."""
    expected = [
        f"{section}.{f.name}" for section in SECTIONS for f in fields(getattr(Config(), section))
    ]
    # top-level keys; Config.user_set and Config.recipe are run state, not keys (no metadata)
    expected += [f.name for f in fields(Config) if f.name not in SECTIONS and f.metadata]
    assert list(CONFIG_SCHEMA) == [k for k in expected if k != "loss.params"]
    config = Config()
    for key, declared in CONFIG_SCHEMA.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        assert value == declared.default, key
    # a list default is a fresh list per config, not shared
    assert Config().eval.ks is not Config().eval.ks


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.image_size=4097", "data.image_size must be <= 4096; got 4097"),
        ("model.embedding_dim=16385", "model.embedding_dim must be <= 16384"),
        ("data.image_size=7", "data.image_size must be >= 8; got 7"),
        ("eval.verify_far=0", "eval.verify_far must be > 0; got 0.0"),
        ("train.grad_clip=0", "train.grad_clip must be > 0"),
        ("train.loggers=[comet]", "train.loggers: 'comet' is not allowed; choose from tensorboard"),
    ],
)
def test_bounds_and_choices_from_the_declaration(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_overrides_are_yaml_scalars() -> None:
    config = load_config(
        None,
        [
            "loss.name=triplet",
            "loss.margin=0.1",
            "train.epochs=5",
            "train.lr=1e-3",
            "train.grad_clip=2",
            "train.patience=null",
            "eval.ks=[1, 5]",
            "train.select_metric=recall@5",
            "out=runs/x",
        ],
    )
    assert config.loss.name == "triplet" and config.loss.params["margin"] == 0.1
    assert config.train.epochs == 5 and config.train.lr == pytest.approx(1e-3)
    assert config.train.grad_clip == 2.0 and isinstance(config.train.grad_clip, float)
    assert config.train.patience is None
    assert config.eval.ks == [1, 5]
    assert config.out == "runs/x"
    assert parse_override("data.root=") == ("data.root", None)
    # YAML 1.1 booleans where a word is meant
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    assert load_config(None, ["data.augment=false"]).data.augment == "none"


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "loss:\n  name: contrastive\n  neg_margin: 0.5\ntrain:\n  epochs: 3\n  lr: 1e-4\nseed: 7\n"
    )
    config = load_config(path, ["train.epochs=4"])
    assert config.loss.name == "contrastive" and config.loss.params["neg_margin"] == 0.5
    assert config.train.epochs == 4 and config.train.lr == pytest.approx(1e-4)
    assert config.seed == 7


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ["loss.margin=0.3", "train.amp=bf16", "data.max_classes=40"])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(config)
    assert config_differences(config_to_flat(config), config_to_flat(again)) == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epoch=5", "unknown key train.epoch; did you mean train.epochs"),
        ("trian.lr=0.1", "unknown key trian.lr; did you mean train.lr"),
        ("model.embeding_dim=8", "did you mean model.embedding_dim"),
        ("loss.margn=0.1", "unknown key loss.margn"),
        ("train.amp=fp32", "train.amp='fp32' is not allowed; choose one of auto, off, bf16, fp16"),
        ("loss.name=nosuchloss", "loss.name='nosuchloss' is not allowed; choose one of"),
        ("train.lr=fast", "train.lr must be a float"),
        ("train.epochs=2.5", "train.epochs must be a int"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.lr=0", "train.lr must be > 0"),
        ("train.select_metric=recall@3", "recall@1, recall@2, recall@4, recall@8"),
        ("data.source=cub", "data.source=cub needs data.root"),
        ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1)"),
        ("loss.margin=-1", "loss 'mdl': margin"),
        ("train.progress=maybe", "train.progress must be a bool"),
        ("model.backbone=vgg", "choose one of smallcnn, smallvgg, resnet18"),
        ("epochs", "must look like key=value"),
    ],
)
def test_errors_name_the_key_and_the_fix(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_loss_parameter_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"its parameters: loss\.margin"):
        load_config(None, ["loss.name=triplet", "loss.alpha=2"])
    # a parameter of one loss is accepted once the loss that has it is chosen
    config = load_config(None, ["loss.name=multisimilarity", "loss.alpha=2"])
    assert config.loss.params["alpha"] == 2.0


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_configurable(name: str) -> None:
    config = load_config(None, [f"loss.name={name}"])
    assert config.loss.name == name
    assert "num_classes" not in loss_parameters(name)
    assert "embedding_dim" not in loss_parameters(name)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(not_mapping)
    section = tmp_path / "section.yaml"
    section.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(section)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr_warmup: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key train\.lr_warmup"):
        load_config(unknown)


def test_shipped_configs_are_valid() -> None:
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert any(f.name == "glyphs_mdl.yaml" for f in files)
    for file in files:
        load_config(file, ["data.root=/data"] if "glyphs" not in file.name else [])


def test_glyphs_mdl_config_equals_the_defaults() -> None:
    shipped = config_to_flat(load_config(ROOT / "configs" / "glyphs_mdl.yaml"))
    # model.backbone=auto resolves to smallvgg on glyphs (tests/test_recipe.py)
    defaults = config_to_flat(load_config(None, ["model.backbone=smallvgg"]))
    shipped.pop("out"), defaults.pop("out")
    assert shipped == defaults


def test_upper_bounds_are_enforced_and_cover_what_sizes_allocations() -> None:
    """Each bound in UPPER_BOUNDS is the largest value load_config accepts for its key (what a
    received checkpoint or model directory is checked against), and the keys that size a
    model's allocations are bounded."""
    assert {"data.image_size", "model.embedding_dim"} <= set(UPPER_BOUNDS)
    for key, bound in UPPER_BOUNDS.items():
        assert isinstance(bound, int) and bound > 0, key
        assert config_to_flat(load_config(None, [f"{key}={bound}"]))[key] == bound
        with pytest.raises(ConfigError, match=rf"{key} must be <= {bound}"):
            load_config(None, [f"{key}={bound + 1}"])


#: for each key a resumed run may change, a value other than its default
_RESUME_FREE_CHANGES = {
    "data.root": "elsewhere",
    "data.num_workers": "2",
    "train.device": "cpu",
    "train.num_threads": "1",
    "train.progress": "false",
    "train.loggers": "[tensorboard]",
    "eval.batch_size": "7",
    "eval.report": "false",
    "eval.kmeans_restarts": "2",
    "eval.verify_far": "0.01",
    "eval.verify_max_pairs": "100",
    "out": "elsewhere",
    "resume": "true",
}
#: keys that change what a run computes: a resumed run must keep them
_RESULT_KEYS = (
    "seed=1",
    "train.lr=0.01",
    "loss.name=triplet",
    "model.embedding_dim=8",
    "data.image_size=64",
    "train.batch_classes=8",
    "eval.distance=cosine",
)


def test_resume_free_keys_are_the_ones_a_resume_may_change() -> None:
    base = config_to_flat(load_config(None, []))
    for key, value in _RESUME_FREE_CHANGES.items():
        changed = config_to_flat(load_config(None, [f"{key}={value}"]))
        assert changed[key] != base[key], key
        assert config_differences(base, changed) == [], key
    assert set(_RESUME_FREE_CHANGES) == RESUME_FREE_KEYS  # no key is free without being listed
    for override in _RESULT_KEYS:
        key = override.partition("=")[0]
        changed = config_to_flat(load_config(None, [override]))
        assert key in config_differences(base, changed), key


def test_resume_differences_ignore_harmless_keys() -> None:
    a = config_to_flat(load_config(None, ["out=a"]))
    b = config_to_flat(load_config(None, ["out=b", "resume=true", "data.num_workers=2"]))
    assert config_differences(a, b) == []
    c = config_to_flat(load_config(None, ["train.lr=0.01"]))
    assert config_differences(a, c) == ["train.lr"]


def test_count_or_auto_keys() -> None:
    """Keys typed int | str (data.num_workers, eval.kmeans_restarts) take auto or a count."""
    assert load_config(None, []).eval.kmeans_restarts == "auto"
    assert load_config(None, ["eval.kmeans_restarts=1"]).eval.kmeans_restarts == 1
    with pytest.raises(ConfigError, match=r"eval\.kmeans_restarts must be auto or a count >= 1"):
        load_config(None, ["eval.kmeans_restarts=some"])
    with pytest.raises(ConfigError, match=r"eval\.kmeans_restarts must be >= 1; got 0"):
        load_config(None, ["eval.kmeans_restarts=0"])
