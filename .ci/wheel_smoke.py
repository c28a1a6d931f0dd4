"""Smoke test of an installed mbdl wheel, run by .ci/run with the fresh venv's Python.

Checks that the installed package (not the source tree) imports, carries its version and
py.typed, that every loss runs forward and backward, that the evaluation runs, and that the
``mbdl`` console script answers ``--version`` and ``train --print-config``.
"""

from __future__ import annotations

import importlib.metadata
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import mbdl
from mbdl.evaluate import evaluate
from mbdl.losses import LOSSES, build_loss, loss_class


def main() -> int:
    package = Path(mbdl.__file__).resolve().parent
    assert "site-packages" in package.parts, f"mbdl imported from {package}, not from the wheel"
    version = importlib.metadata.version("mbdl")
    assert mbdl.__version__ == version, (mbdl.__version__, version)
    assert (package / "py.typed").is_file(), "py.typed is missing from the wheel"

    torch.manual_seed(0)
    labels = torch.arange(6).repeat_interleave(4)
    sizes = {"num_classes": 6, "embedding_dim": 16}
    for name in LOSSES:
        embeddings = torch.randn(24, 16, requires_grad=True)
        loss = build_loss(name, **{key: sizes[key] for key in loss_class(name).needs})
        value = loss(embeddings, labels)
        value.backward()
        assert math.isfinite(value.item()), name
        assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all(), name

    scores = evaluate(torch.randn(60, 8), torch.arange(6).repeat_interleave(10))
    assert {"recall@1", "map@r", "nmi", "f1"} <= set(scores), scores

    script = shutil.which("mbdl", path=str(Path(sys.executable).parent))
    assert script is not None, "the mbdl console script is not installed"
    out = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"mbdl {version}", out.stdout
    config = subprocess.run(
        [script, "train", "--print-config", "loss.name=triplet"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "triplet" in config.stdout, config.stdout
    print(f"wheel smoke test passed: mbdl {version} from {package}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
