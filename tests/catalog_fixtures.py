"""A real small catalog for the dedup, serve and engine tests: a smallcnn trained for one step
on glyphs (it has a validated verification threshold), a folder of glyphs test images with
planted near-duplicates, and the catalog index built from them by ``build_catalog``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SMALL = [
    "data.max_classes=30",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.batch_classes=8",
    "train.batch_per_class=4",
    "train.max_steps_per_epoch=1",
    "train.warmup_epochs=0",
    "train.progress=false",
    "train.device=cpu",
    "train.num_threads=1",
    "eval.ks=[1]",
    "eval.report=false",
]
#: (original, copy) file names of the planted near-duplicates
PLANTED = (("00003.png", "copy-3.png"), ("00010.png", "copy-10.png"))


@dataclass
class TinyCatalog:
    root: Path
    model: Path
    images: Path
    index: Path


def make_tiny_catalog(root: Path, images: int = 48) -> TinyCatalog:
    from mbdl.catalog import build_catalog
    from mbdl.config import load_config
    from mbdl.inference import load_data
    from mbdl.train import train

    config = load_config(None, [*SMALL, f"data.root={root / 'cache'}", f"out={root / 'run'}"])
    train(config)
    test = load_data(config).test
    folder = root / "images"
    for i in range(images):
        sub = folder / f"class{int(test.labels[i]):02d}"
        sub.mkdir(parents=True, exist_ok=True)
        test.load_image(i).save(sub / f"{i:05d}.png")
    for original, copy in PLANTED:  # a resized copy: a near-duplicate
        source = next(folder.rglob(original))
        from PIL import Image

        with Image.open(source) as image:
            image.resize((36, 36)).save(source.parent / copy)
    index = root / "index"
    build_catalog(root / "run", index, images=folder, progress=False)
    return TinyCatalog(root, root / "run", folder, index)
