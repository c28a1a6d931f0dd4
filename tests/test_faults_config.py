"""Configs under hostile input (duplicate keys, an alias bomb, deep nesting, random damage) and
the run-level rules: resume compares with the checkpoint's stored config, a run whose
evaluation embeddings overflow is a diverged run (exit 1 with advice), not bad input."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pytest
import torch
import yaml

from mbdl.cli import main
from mbdl.config import ConfigError, load_config
from mbdl.errors import EXIT_DIVERGED
from mbdl.train import train
from mbdl.train.checkpoint import load_checkpoint

TINY = [
    "data.max_classes=24",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.batch_classes=4",
    "train.batch_per_class=2",
    "train.max_steps_per_epoch=1",
    "train.progress=false",
    "train.device=cpu",
    "eval.ks=[1]",
    "eval.report=false",
]

BOMB = (  # 9 levels of 9 references: 9**9 strings once expanded, about 300 bytes
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    + "".join(
        f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
)


def cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: 2\nmodel:\n  embedding_dim: 8\ntrain:\n  lr: 0.1\n", "'train' appears twice (line 5)"),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "'lr' appears twice (line 3)"),
        (BOMB, "more than 100000 values once aliases are expanded"),
        ("eval:\n  ks: &k [" + ",".join(["1"] * 50) + "]\ntrain:\n  lr: [" + ",".join(["*k"] * 120) + "]\n", "more than 100 aliases"),
        ("a: " + "[" * 2000 + "]" * 2000 + "\n", "nests deeper than 32 levels"),
        ("".join("  " * i + f"k{i}:\n" for i in range(100)), "nests deeper than 32 levels"),
    ],
)  # fmt: skip
def test_hostile_yaml_is_one_bounded_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    code, err = cli("train", str(path), "--print-config")
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and len(err) < 600


def test_an_alias_bomb_under_a_valid_key_is_not_formatted_in_full(tmp_path: Path) -> None:
    small = "eval:\n  ks: &a [1,1,1,1,1,1,1,1,1]\ntrain:\n  lr: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    (tmp_path / "c.yaml").write_text(small)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "c.yaml")
    assert "train.lr must be a float" in str(caught.value) and len(str(caught.value)) < 400


def test_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = "train: &t\n  epochs: 2\n  lr: 0.01\neval:\n  ks: [1, 2]\n"
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").train.epochs == 2


def test_randomly_damaged_configs_are_one_line(tmp_path: Path) -> None:
    """Seeded damage to a real config: truncation, flipped bytes, inserted junk. Each one loads
    or is refused with one ConfigError line; nothing else escapes."""
    from mbdl.config import config_to_yaml

    original = config_to_yaml(load_config(None, TINY)).encode()
    rng = random.Random(24)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(60):
        data = bytearray(original)
        kind = case % 3
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            at = rng.randrange(len(data))
            data[at:at] = rng.choice(
                [b"&a [1]", b"*a", b"{", b"- ", b": :", b"\x00", b"!!python/object:os.system"]
            )
        path = tmp_path / f"c{case}.yaml"
        path.write_bytes(bytes(data))
        try:
            load_config(path)
            outcomes["loaded"] += 1
        except ConfigError as error:
            assert "\n" not in str(error) and len(str(error)) < 1000
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 60


# -- resume and divergence ---------------------------------------------------------------------


def test_resume_compares_with_the_checkpoint_not_an_edited_config_yaml(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [*TINY, "train.epochs=2", f"data.root={tmp_path}", f"out={out}"]
    with pytest.MonkeyPatch.context() as patch:  # stop after the first epoch's checkpoint
        from mbdl.train.trainer import Trainer

        original = Trainer._end_epoch

        def stop(self: Trainer, validation: object) -> None:
            original(self, validation)
            raise KeyboardInterrupt

        patch.setattr(Trainer, "_end_epoch", stop)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(None, overrides))
    stored = load_checkpoint(out / "checkpoints" / "last.pt")["config"]
    edited = yaml.safe_load((out / "config.yaml").read_text())
    edited["train"]["lr"] = 0.5  # an edit of the copy in the run directory
    (out / "config.yaml").write_text(yaml.safe_dump(edited))
    code, err = cli("train", str(out / "config.yaml"), f"out={out}", "resume=true")
    assert code == 2 and "train.lr" in err and "last checkpoint" in err, err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["config"] == stored


def test_embeddings_that_overflow_in_evaluation_are_a_diverged_run(tmp_path: Path) -> None:
    from mbdl.train import trainer

    real = trainer.evaluate_dataset

    def overflowing(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1e30)  # finite weights whose activations overflow to inf
        return real(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "evaluate_dataset", overflowing)
        code, err = cli(
            "train",
            *TINY,
            "data.val_fraction=0.3",
            f"data.root={tmp_path}",
            f"out={tmp_path / 'run'}",
        )
    assert code == EXIT_DIVERGED, err
    assert "embeddings contain NaN or Inf" in err and "Lower train.lr" in err
    assert err.count("\n") == 1
