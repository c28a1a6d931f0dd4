"""Every file mbdl reads back, damaged: a checkpoint (.pt), a model directory (config.json,
preprocessing.json, model.safetensors), an embeddings output (.npy, .labels.npy, .json,
.paths.txt). Seeded cases (truncated at a random offset, bytes flipped, an oversized header or
count written over the start) are loaded in a subprocess with a timeout: each one loads or is
refused as one line by the error contract; never a hang, an interpreter crash, another kind of
exception (a traceback in the CLI) or a peak memory growth past :data:`RSS_BOUND`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbdl.embedstore import ImageFiles, embed_to_files
from mbdl.export import load_embedder, save_pretrained
from mbdl.models import build_model
from mbdl.train.checkpoint import save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
SLOW = os.environ.get("MBDL_SLOW", "") not in ("", "0")
#: the largest growth of the loading process's peak memory over all cases of one kind
RSS_BOUND = 256 << 20

#: (kind, the file damaged): what is loaded is what `mbdl embed/eval/export` load first
KINDS = [
    ("checkpoint", "model.pt"),
    ("model", "config.json"),
    ("model", "preprocessing.json"),
    ("model", "model.safetensors"),
    ("embeddings", "g.npy"),
    ("embeddings", "g.labels.npy"),
    ("embeddings", "g.json"),
    ("embeddings", "g.paths.txt"),
]

FUZZ = r"""
import json, random, resource, shutil, sys
from pathlib import Path
from mbdl.cli import USER_ERRORS
from mbdl.embedstore import load_embeddings
from mbdl.errors import one_line
from mbdl.export import load_state, state_preprocessing, transform_from_spec
from mbdl.train.checkpoint import model_from_state

source, kinds, cases, seed, work = sys.argv[1:6]
source, work = Path(source), Path(work)

def load_model(path):
    state = load_state(path)
    model_from_state(state, "cpu")
    transform_from_spec(state_preprocessing(state))

LOADERS = {
    "checkpoint": ("checkpoint", lambda folder: load_model(folder / "model.pt")),
    "model": ("model", lambda folder: load_model(folder)),
    "embeddings": ("embeddings", lambda folder: load_embeddings(folder / "g.npy")),
}
JUNK = [b"9" * 12, b"\xff" * 8, b"99999999999999999999", b'{"a":' * 40, b"\x00" * 8]
def fuzz(kind, name, rng):
    folder_name, load = LOADERS[kind]
    results = {"loaded": 0, "refused": 0, "escaped": []}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(int(cases)):
        folder = work / f"case{case}"
        shutil.copytree(source / folder_name, folder)
        victim = folder / name
        data = bytearray(victim.read_bytes())
        how = case % 3
        if how == 0:
            data = data[: rng.randrange(len(data))]
        elif how == 1:
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            junk, at = rng.choice(JUNK), rng.randrange(min(len(data), 256))
            data[at : at + len(junk)] = junk
        victim.write_bytes(bytes(data))
        try:
            load(folder)
            results["loaded"] += 1
        except Exception as error:
            message = one_line(error)
            if not isinstance(error, USER_ERRORS) or len(message) > 1000:
                results["escaped"].append(f"case {case}: {type(error).__name__}: {message[:200]}")
            else:
                results["refused"] += 1
        shutil.rmtree(folder)
    results["rss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return results

print(json.dumps({
    spec: fuzz(*spec.split("/"), random.Random(int(seed))) for spec in kinds.split(",")
}))
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-sources")
    torch.manual_seed(0)
    model = build_model("smallcnn", 8, in_channels=3)
    state = {
        "config": {},
        "model_args": dict(model.build_args),
        "data_args": {"image_size": 16, "channels": 3},
        "model_state": model.state_dict(),
    }
    (root / "checkpoint").mkdir()
    save_checkpoint(root / "checkpoint" / "model.pt", state)
    save_pretrained(root / "checkpoint" / "model.pt", root / "model")
    images = root / "images" / "a"
    images.mkdir(parents=True)
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    embedder, transform = load_embedder(root / "model")
    dataset = ImageFiles(images.parent, transform)
    embed_to_files(embedder, dataset, root / "embeddings" / "g.npy", dim=8, progress=False)
    return root


@pytest.fixture(scope="module")
def results(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every kind's cases, in one subprocess (one start of torch)."""
    cases = 300 if SLOW else 12
    kinds = ",".join(f"{kind}/{name}" for kind, name in KINDS)
    work = tmp_path_factory.mktemp("fuzz-work")
    done = subprocess.run(
        [sys.executable, "-c", FUZZ, str(sources), kinds, str(cases), "24", str(work)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=300 + 4 * cases,  # a hang fails here
        check=False,
    )
    assert done.returncode == 0, f"the loader crashed ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(("kind", "name"), KINDS)
def test_damaged_files_load_or_are_refused_in_one_line(
    results: dict[str, dict], kind: str, name: str
) -> None:
    outcome = results[f"{kind}/{name}"]
    assert outcome["escaped"] == [], outcome["escaped"]
    assert outcome["rss_growth"] < RSS_BOUND, f"{outcome['rss_growth'] >> 20} MiB"
    print(f"{kind}/{name}: {outcome}")
