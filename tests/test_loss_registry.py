"""The loss registry and loss plugins: one declaration per loss, found without a hand list;
``loss.name=package.module:Class`` and entry points resolved, checked and configured like the
built-ins; training, resuming, ``mbdl compare`` and ``mbdl eval`` with a plugin loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from mbdl.cli import main
from mbdl.compare import SEARCH_GRIDS, check_request, compare, max_search_budget
from mbdl.config import LOSS_NAMES, ConfigError, load_config, loss_parameters
from mbdl.losses import (
    LOSSES,
    FunctionalLoss,
    LossDeclarationError,
    MetricLoss,
    builtin_losses,
    discover_losses,
    loss_class,
)
from mbdl.plugins import PluginError
from mbdl.train import train
from mbdl.train import trainer as trainer_module
from mbdl.train.checkpoint import load_checkpoint

SQUARED = "example_loss_plugin:SquaredContrastiveLoss"
CENTER = "example_loss_plugin:CenterLoss"


# ------------------------------------------------------------------------ one declaration


def test_every_built_in_declares_itself_completely() -> None:
    assert set(builtin_losses()) >= {
        "mdl",
        "contrastive",
        "triplet",
        "lifted",
        "npair",
        "margin",
        "multisimilarity",
        "proxyanchor",
    }
    for name, cls in builtin_losses().items():
        assert issubclass(cls, MetricLoss) and cls.name == name
        param, values = cls.search_grid or ("", ())
        assert loss_parameters(name)[param] == values[0], name  # the default first
        assert set(cls.needs) <= {"num_classes", "embedding_dim"}
        assert name in LOSS_NAMES and SEARCH_GRIDS[name] == (param, values)


def test_config_choices_and_compare_grids_follow_the_registry() -> None:
    assert tuple(LOSS_NAMES) == LOSSES.names() == tuple(SEARCH_GRIDS)
    assert max_search_budget() == max(len(v) for _, v in SEARCH_GRIDS.values())


def _class(**attributes: Any) -> type:
    """Define a loss class with these class attributes (the declaration check runs at once)."""

    def __init__(self: Any, margin: float = 0.2, num_classes: int | None = None) -> None:
        MetricLoss.__init__(self)

    return type("Declared", (MetricLoss,), {"__init__": __init__, **attributes})


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"name": "declared"}, r"\(loss.name=declared\) declares no search_grid"),
        ({"name": "declared", "search_grid": ("margin", ())}, "must be \\(keyword, \\(numbers"),
        ({"name": "declared", "search_grid": ("alpha", (0.2,))}, "'alpha', which is not a keyword"),
        ({"name": "declared", "search_grid": ("margin", (0.1, 0.2))}, "start with the default"),
        ({"name": "Bad-Name", "search_grid": ("margin", (0.2,))}, "name must be lower-case"),
        ({"needs": ("embedding_dim",)}, "needs lists embedding_dim but __init__ takes no such"),
        ({"needs": ("batch_size",)}, "needs must be a tuple of num_classes, embedding_dim"),
        ({"accepts_ref": "yes"}, "accepts_ref must be True or False"),
    ],
)
def test_an_incomplete_declaration_cannot_be_defined(attributes: dict, message: str) -> None:
    with pytest.raises(LossDeclarationError, match=message):
        _class(**attributes)


def test_a_complete_declaration_and_an_unnamed_subclass_are_fine() -> None:
    declared = _class(name="declared", search_grid=("margin", (0.2, 0.4)), needs=("num_classes",))
    assert declared.search_grid == ("margin", (0.2, 0.4))
    unnamed = type("Variant", (declared,), {})  # inherits the name: not registered twice
    assert "name" not in vars(unnamed)


def test_a_new_file_with_a_named_class_is_all_a_loss_needs(tmp_path: Path) -> None:
    package = tmp_path / "extra_losses_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("VALUE = 1\n")  # modules without losses are fine
    (package / "halfmargin.py").write_text(
        "from mbdl.functional.contrastive import contrastive_loss\n"
        "from mbdl.losses import FunctionalLoss\n\n\n"
        "class HalfMargin(FunctionalLoss):\n"
        "    name = 'halfmargin'\n"
        "    search_grid = ('neg_margin', (0.5, 0.25))\n"
        "    loss_function = staticmethod(contrastive_loss)\n"
        "    hyper_parameters = ('neg_margin',)\n\n"
        "    def __init__(self, neg_margin: float = 0.5) -> None:\n"
        "        super().__init__()\n"
        "        self.neg_margin = neg_margin\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        found = discover_losses("extra_losses_pkg", [str(package)])
        assert list(found) == ["halfmargin"] and issubclass(found["halfmargin"], FunctionalLoss)
        (package / "twin.py").write_text(
            "from extra_losses_pkg.halfmargin import HalfMargin\n\n\n"
            "class Twin(HalfMargin):\n"
            "    name = 'halfmargin'\n"
        )
        with pytest.raises(LossDeclarationError, match="'halfmargin' is declared twice"):
            discover_losses("extra_losses_pkg", [str(package)])
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.startswith("extra_losses_pkg")]:
            del sys.modules[module]


def test_compare_default_grid_selection_covers_every_registered_loss(tmp_path: Path) -> None:
    """`mbdl compare` with its default --losses: every loss's grid is found and every searched
    configuration validates (a loss without a grid used to raise KeyError here)."""
    from mbdl.cli import build_parser

    args = build_parser().parse_args(["compare"])
    losses = [name for name in str(args.losses).split(",") if name]
    assert losses == list(LOSSES.names())
    check_request(losses, 1, max_search_budget())
    trained: list[str] = []

    def fake_train(config: Any) -> dict[str, Any]:  # records the run; no training
        trained.append(f"{config.loss.name}:{config.out}")
        score = {"map@r": 0.5, "recall@1": 0.5}
        return {"validation": score, "test": {**score, "nmi": 0.5}}

    summary = compare(
        None,
        ["train.epochs=1"],
        losses=losses,
        seeds=1,
        search_budget=max_search_budget(),
        out=tmp_path,
        train_fn=fake_train,
        log=lambda _: None,
    )
    assert set(summary["losses"]) == set(losses)
    for name in losses:
        param, grid = SEARCH_GRIDS[name]
        assert summary["settings"]["grids"][name] == {"param": param, "values": list(grid)}
        assert len({run for run in trained if run.startswith(f"{name}:")}) == len(grid)


# -------------------------------------------------------------------------------- plugins


def test_a_plugin_loss_is_configured_like_a_built_in() -> None:
    config = load_config(None, [f"loss.name={SQUARED}", "loss.margin=0.5"])
    assert config.loss.name == SQUARED and config.loss.params == {"margin": 0.5}
    assert loss_class(SQUARED).__name__ == "SquaredContrastiveLoss"
    config = load_config(None, [f"loss.name={CENTER}", "loss.scale=2"])
    assert config.loss.params == {"scale": 2.0}  # int -> float, as for built-ins
    assert SQUARED in LOSS_NAMES and SEARCH_GRIDS[SQUARED] == ("margin", (1.0, 0.5, 1.5))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [f"loss.name={SQUARED}", "loss.margn=0.5"],
            "unknown key loss.margn: not a parameter of "
            f"loss '{SQUARED}'; did you mean loss.margin",
        ),
        ([f"loss.name={SQUARED}", "loss.margin=wide"], "loss.margin must be a float"),
        ([f"loss.name={SQUARED}", "loss.margin=-1"], "margin must be > 0; got -1.0"),
        ([f"loss.name={CENTER}", "loss.num_classes=3"], "unknown key loss.num_classes"),
        ([f"loss.name={CENTER}", "train.xbm_size=64"], "needs a loss that takes a reference set"),
        (["loss.name=no_such_module_xyz:Loss"], "cannot import module 'no_such_module_xyz'"),
        (["loss.name=example_loss_plugin:Missing"], "has no 'Missing'"),
        (["loss.name=example_loss_plugin:NotALoss"], "NotALoss is not a torch.nn.Module"),
        (["loss.name=example_loss_plugin:WrongForward"], "must take (embeddings, labels, ref_emb"),
        (["loss.name=example_loss_plugin:UndeclaredNeeds"], "declare needs = ('num_classes',)"),
        (["loss.name=example_loss_plugin:torch"], "is a module, not a class"),
        (["loss.name=nosuchloss"], "loss.name='nosuchloss' is not allowed; choose one of mdl, "),
    ],
)
def test_a_bad_plugin_is_one_clear_config_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_plugin_stops_the_cli_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "loss.name=example_loss_plugin:WrongForward"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "loss.name: loss 'example_loss_plugin:WrongForward'" in lines[0]


def test_an_installed_package_names_its_loss_by_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "squared_losses-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: squared-losses\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mbdl.losses]\nsquared = {SQUARED}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "squared" in LOSS_NAMES and LOSSES.names()[-1] == "squared"
    config = load_config(None, ["loss.name=squared", "loss.margin=0.7"])
    assert config.loss.params == {"margin": 0.7}
    assert loss_class("squared") is loss_class(SQUARED)


def test_the_plugin_class_check_names_what_is_wrong() -> None:
    with pytest.raises(PluginError, match="forward takes no anchor_offset keyword"):

        class NoOffset(torch.nn.Module):
            def forward(self, embeddings: Tensor, labels: Tensor, ref_emb=None, ref_labels=None):
                return embeddings.sum()

        LOSSES._check(NoOffset, "no-offset")  # type: ignore[misc]


# ------------------------------------------------------- training, resuming, eval, compare

SMALL = [
    "data.max_classes=40",
    "model.embedding_dim=16",
    "train.epochs=2",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=3",
    "train.warmup_epochs=0.5",
    "train.checkpoint_every_steps=2",
    "train.progress=false",
    "train.device=cpu",
    "train.num_threads=1",
    "eval.ks=[1, 2]",
    "eval.report=false",
]


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("glyph-cache"))


def _config(out: Path, cache: str, *extra: str) -> Any:
    return load_config(None, [*SMALL, f"data.root={cache}", f"out={out}", *extra])


@pytest.fixture(scope="module")
def center_run(tmp_path_factory: pytest.TempPathFactory, glyph_cache: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("plugin") / "center"
    metrics = train(_config(out, glyph_cache, f"loss.name={CENTER}", "loss.scale=2"))
    return out, metrics


def test_a_plain_module_plugin_trains_with_the_trainers_arguments(
    center_run: tuple[Path, dict],
) -> None:
    out, metrics = center_run
    assert metrics["test"]["map@r"] >= 0
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["config"]["loss"] == {"name": CENTER, "scale": 2.0}  # the name string
    centers = [value for key, value in last["loss_state"].items() if key.endswith("centers")]
    assert len(centers) == 1 and centers[0].shape[1] == 16  # embedding_dim from the trainer


def test_a_plugin_loss_run_resumes_exactly(
    center_run: tuple[Path, dict],
    tmp_path: Path,
    glyph_cache: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, metrics = center_run
    run = tmp_path / "interrupted"
    original = trainer_module.Trainer._train_step

    def interrupt_at_step_5(self: Any, images: Tensor, labels: Tensor) -> float:
        if self.progress.global_step == 4:
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, glyph_cache, f"loss.name={CENTER}", "loss.scale=2"))
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", original)
    resumed = train(_config(run, glyph_cache, f"loss.name={CENTER}", "loss.scale=2", "resume=true"))
    assert resumed == metrics


def test_eval_reads_a_plugin_loss_run(
    center_run: tuple[Path, dict],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, metrics = center_run
    assert main(["eval", str(out), "--json"]) == 2  # a stored import path is not trusted by default
    assert "loss.name=example_loss_plugin:CenterLoss names code to import and run" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("MBDL_TRUST_PLUGINS", "1")
    assert main(["eval", str(out), "--json"]) == 0
    from mbdl.evaluate import split_metrics

    printed = json.loads(capsys.readouterr().out)  # {"metrics": table, "meta": run metadata}
    assert printed["metrics"] == pytest.approx(split_metrics(metrics["test"])[0])


def test_compare_runs_a_plugin_loss(tmp_path: Path, glyph_cache: str) -> None:
    overrides = [o for o in SMALL if not o.startswith("train.epochs")]
    summary = compare(
        None,
        [*overrides, "train.epochs=1", f"data.root={glyph_cache}"],
        losses=[SQUARED],
        seeds=1,
        search_budget=1,
        out=tmp_path,
        log=lambda _: None,
    )
    entry = summary["losses"][SQUARED]
    assert entry["chosen"] == {"margin": 1.0}
    assert entry["test"]["map@r"]["mean"] >= 0
