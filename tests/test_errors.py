"""Every failure mode of docs/errors.md, each run through ``mbdl`` (in process): the exit code,
one terminal-safe line on stderr, no traceback, and, for bad input, nothing trained first.

``python tests/test_errors.py`` runs every case and prints the table of docs/errors.md from the
measured exit codes and messages (paths shown as placeholders).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_data import make_folder, write_undecodable_png
from mbdl.cli import main
from mbdl.train.checkpoint import load_checkpoint, save_checkpoint
from mbdl.train.runlock import RUN_LOCK

TINY = [
    "data.source=folder",
    "data.image_size=16",
    "data.val_fraction=0",
    "model.embedding_dim=8",
    "train.epochs=1",
    "train.batch_classes=2",
    "train.batch_per_class=2",
    "train.max_steps_per_epoch=2",
    "train.num_threads=1",
    "train.progress=false",
    "train.device=cpu",
    "eval.ks=[1]",
    "eval.report=false",
]


@dataclass
class Context:
    """What a case builds its input from: a scratch folder, a finished run and its index."""

    tmp: Path
    run: Path
    index: Path
    monkeypatch: pytest.MonkeyPatch

    def folder(self, num_classes: int = 6, per_class: int = 4) -> Path:
        return make_folder(self.tmp / "data", num_classes, per_class)

    def train(self, root: Path, *extra: str) -> list[str]:
        return ["train", *TINY, f"data.root={root}", f"out={self.tmp / 'out'}", *extra]

    def checkpoint(self, edit: Callable[[dict[str, Any]], None]) -> Path:
        state = load_checkpoint(self.run / "checkpoints" / "best.pt")
        edit(state)
        path = self.tmp / "edited.pt"
        save_checkpoint(path, state)
        return path

    def query(self) -> str:
        path = self.tmp / "query.png"
        Image.new("RGB", (20, 20), (10, 20, 30)).save(path)
        return str(path)

    def index_copy(self) -> Path:
        target = self.tmp / "gallery.index"
        shutil.copytree(self.index, target)
        return target


@dataclass
class Case:
    name: str
    given: str
    code: int
    message: str  # a regular expression the printed line must contain
    make: Callable[[Context], list[str]]
    before_training: bool = False  # bad input: refused before any checkpoint is written


CASES: list[Case] = []


def case(
    name: str, given: str, code: int, message: str, *, before_training: bool = False
) -> Callable[[Callable[[Context], list[str]]], Callable[[Context], list[str]]]:
    def register(make: Callable[[Context], list[str]]) -> Callable[[Context], list[str]]:
        CASES.append(Case(name, given, code, message, make, before_training))
        return make

    return register


# -- configuration ------------------------------------------------------------------------------


@case("unknown-key", "a misspelt config key", 2, r"unknown key train\.epoch; did you mean")
def _(ctx: Context) -> list[str]:
    return ["train", "train.epoch=5"]


@case("bad-choice", "a value outside the allowed ones", 2, r"eval\.distance.*choose one of")
def _(ctx: Context) -> list[str]:
    return ["train", "eval.distance=manhattan"]


@case(
    "ks-vs-split",
    "eval.ks larger than the test split",
    2,
    r"eval\.ks has K=50 but the test split offers only 11",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    return ctx.train(ctx.folder(), "eval.ks=[1,50]")


@case(
    "pk-vs-classes",
    "train.batch_classes above the training classes",
    2,
    r"train\.batch_classes=5 but the training split has only 3 classes",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    return ctx.train(ctx.folder(), "train.batch_classes=5")


@case(
    "one-image-classes",
    "every class holds one image",
    2,
    r"every training class has one image",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    return ctx.train(ctx.folder(per_class=1))


# -- images and folders -------------------------------------------------------------------------


@case(
    "undecodable-image",
    "a PNG whose pixel data is garbage (valid chunks), in a test class",
    2,
    r"image cannot be read: \S*class_5/0\.png \(.*\); 1 of 24 .*skip_corrupt=true",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    write_undecodable_png(root / "class_5" / "0.png")
    return ctx.train(root)


@case(
    "truncated-image",
    "a truncated image",
    2,
    r"class_4/1\.png \(.*(truncated|Truncated|EOF|broken)",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    path = root / "class_4" / "1.png"
    path.write_bytes(path.read_bytes()[:60])
    return ctx.train(root)


@case(
    "fifo-image",
    "a named pipe called x.png (reading it would block)",
    2,
    r"pipe\.png \(not a regular file\)",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    os.mkfifo(root / "class_1" / "pipe.png")
    return ctx.train(root)


@case(
    "decompression-bomb",
    "an image above the pixel limit (limit lowered to 100 pixels here)",
    2,
    r"12 x 10 pixels is more than the limit of 100",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    ctx.monkeypatch.setattr("mbdl.data.files.MAX_PIXELS", 100)
    return ctx.train(ctx.folder())


@case(
    "float-image",
    "a 32-bit float TIFF (no defined range)",
    2,
    r"f\.tif \(pixel mode F is not supported",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    Image.fromarray(np.ones((10, 12), dtype=np.float32)).save(root / "class_2" / "f.tif")
    return ctx.train(root)


@case(
    "link-outside-root",
    "a symbolic link to an image outside data.root",
    2,
    r"resolves to .*outside the data root .*data\.allow_outside_root=true",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    outside = ctx.tmp / "elsewhere.png"
    shutil.copy(root / "class_0" / "0.png", outside)
    os.symlink(outside, root / "class_0" / "link.png")
    return ctx.train(root)


@case(
    "file-in-two-classes",
    "one file reached from two class folders",
    2,
    r"class_3/x\.png \(class 'class_3'\) and class_0/0\.png \(class 'class_0'\) are the same",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    os.symlink(root / "class_0" / "0.png", root / "class_3" / "x.png")
    return ctx.train(root)


@case(
    "hostile-class-name",
    "a class folder named with a terminal escape sequence, holding a broken image",
    2,
    r"evil\\x1b\[2J/0\.png",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    os.rename(root / "class_5", root / "evil\x1b[2J")
    (root / "evil\x1b[2J" / "0.png").write_bytes(b"not an image")
    return ctx.train(root)


@case(
    "non-utf8-name",
    "a class folder whose name is not UTF-8, holding a broken image",
    2,
    r"cl\\udcffass/0\.png",
    before_training=True,
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    os.rename(root / "class_5", os.fsdecode(bytes(root / "cl") + b"\xffass"))
    (Path(os.fsdecode(bytes(root / "cl") + b"\xffass")) / "0.png").write_bytes(b"not an image")
    return ctx.train(root)


@case(
    "image-size-too-large",
    "data.image_size=100000 (10^10 pixels per image)",
    2,
    r"data\.image_size must be <= 4096",
)
def _(ctx: Context) -> list[str]:
    return ["train", "data.image_size=100000"]


@case(
    "scan-unreadable",
    "mbdl scan of a folder with two unreadable images",
    2,
    r"2 image\(s\) cannot be used \(listed above\)",
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    (root / "class_1" / "0.png").write_bytes(b"")
    (root / "class_4" / "2.png").write_bytes(b"nope")
    return ["scan", *ctx.train(root)[1:]]


@case("missing-root", "data.root that does not exist", 2, r"image folder not found")
def _(ctx: Context) -> list[str]:
    return ctx.train(ctx.tmp / "nowhere")


# -- checkpoints --------------------------------------------------------------------------------


@case("truncated-checkpoint", "a checkpoint cut in half", 2, r"not a torch zip file")
def _(ctx: Context) -> list[str]:
    data = (ctx.run / "checkpoints" / "best.pt").read_bytes()
    (ctx.tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    return ["eval", str(ctx.tmp / "cut.pt")]


class _RunsCode:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


@case("pickle-with-code", "a checkpoint whose pickle would call os.system", 2, r"refusing to load")
def _(ctx: Context) -> list[str]:
    torch.save({"format": "mbdl-checkpoint", "payload": _RunsCode()}, ctx.tmp / "evil.pt")
    return ["eval", str(ctx.tmp / "evil.pt")]


@case(
    "huge-embedding-dim",
    "a checkpoint whose model_args ask for a 10^9-wide head",
    2,
    r"embedding_dim 1000000000 is outside 1\.\.16384",
)
def _(ctx: Context) -> list[str]:
    return ["eval", str(ctx.checkpoint(lambda s: s["model_args"].update(embedding_dim=10**9)))]


@case(
    "wrong-shapes",
    "a checkpoint whose head weight has another shape",
    2,
    r"model_state does not match the model: head\.\S+ has shape \(3,\)",
)
def _(ctx: Context) -> list[str]:
    def edit(state: dict[str, Any]) -> None:
        key = next(k for k in state["model_state"] if k.startswith("head."))
        state["model_state"][key] = torch.zeros(3)

    return ["eval", str(ctx.checkpoint(edit))]


@case(
    "wrong-field-type",
    "a checkpoint whose model_args is a string",
    2,
    r"field 'model_args' must be dict, got str",
)
def _(ctx: Context) -> list[str]:
    return ["eval", str(ctx.checkpoint(lambda s: s.update(model_args="resnet")))]


@case(
    "zip-bomb-checkpoint",
    "a checkpoint zip with a deflated entry expanding to 64 MB",
    2,
    r"declares \d+ bytes of \(compressed\) contents in a \d+-byte file",
)
def _(ctx: Context) -> list[str]:
    source = ctx.run / "checkpoints" / "best.pt"
    target = ctx.tmp / "bomb.pt"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            new.writestr(item, old.read(item.filename), compress_type=zipfile.ZIP_STORED)
        new.writestr("best/data/999", bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    return ["eval", str(target)]


@case(
    "resume-wrong-checkpoint",
    "resume=true where last.pt holds another model's weights",
    2,
    r"last\.pt model does not match the model",
)
def _(ctx: Context) -> list[str]:
    root = ctx.folder()
    out = ctx.tmp / "out"
    assert main(ctx.train(root, "train.epochs=2", "train.max_steps_per_epoch=1")) == 0
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    key = next(k for k in state["model_state"] if k.startswith("head."))
    state["model_state"][key] = torch.zeros(3)
    state["progress"]["epoch"] = 1  # as if interrupted after the first epoch
    save_checkpoint(last, state)
    (out / "metrics.json").unlink()
    return ctx.train(root, "train.epochs=2", "train.max_steps_per_epoch=1", "resume=true")


# -- gallery indexes ----------------------------------------------------------------------------


@case("index-missing-file", "an index directory without labels.npy", 2, r"labels\.npy is missing")
def _(ctx: Context) -> list[str]:
    index = ctx.index_copy()
    (index / "labels.npy").unlink()
    return ["search", "--index", str(index), str(ctx.run), ctx.query()]


@case("index-truncated", "index.faiss cut short", 2, r"index\.faiss has \d+ bytes, fewer than")
def _(ctx: Context) -> list[str]:
    index = ctx.index_copy()
    data = (index / "index.faiss").read_bytes()
    (index / "index.faiss").write_bytes(data[:100])
    return ["search", "--index", str(index), str(ctx.run), ctx.query()]


@case(
    "index-huge-header",
    "index.faiss whose header asks for 20 GB",
    2,
    r"cannot read \S*index\.faiss \(std::bad_alloc\)",
)
def _(ctx: Context) -> list[str]:
    index = ctx.index_copy()
    data = bytearray((index / "index.faiss").read_bytes())
    offset = 4 + 4 + 8 + 8 + 8 + 1 + 4  # IndexFlat: fourcc, d, ntotal, 2 dummies, trained, metric
    data[offset : offset + 8] = struct.pack("<Q", 5 * 10**9)
    (index / "index.faiss").write_bytes(bytes(data))
    return ["search", "--index", str(index), str(ctx.run), ctx.query()]


@case(
    "index-labels-shape",
    "labels.npy of another shape than meta.json's item count",
    2,
    r"labels\.npy holds int64 \(2, 3\); expected \d+ integer labels",
)
def _(ctx: Context) -> list[str]:
    index = ctx.index_copy()
    np.save(index / "labels.npy", np.zeros((2, 3), dtype=np.int64))
    return ["search", "--index", str(index), str(ctx.run), ctx.query()]


@case("index-meta-json", "meta.json that is not JSON", 2, r"meta\.json is not valid JSON")
def _(ctx: Context) -> list[str]:
    index = ctx.index_copy()
    (index / "meta.json").write_text("{not json")
    return ["search", "--index", str(index), str(ctx.run), ctx.query()]


@case(
    "index-meta-types",
    "meta.json whose dim is a string",
    2,
    r"meta\.json: dim must be an integer in 0\.\.16384",
)
def _(ctx: Context) -> list[str]:
    index = ctx.index_copy()
    meta = json.loads((index / "meta.json").read_text())
    meta["dim"] = "8"
    (index / "meta.json").write_text(json.dumps(meta))
    return ["search", "--index", str(index), str(ctx.run), ctx.query()]


# -- query images -------------------------------------------------------------------------------


@case("query-not-image", "a query file that is not an image", 2, r"cannot read image \S*q\.png")
def _(ctx: Context) -> list[str]:
    (ctx.tmp / "q.png").write_bytes(b"hello")
    return ["search", str(ctx.run), str(ctx.tmp / "q.png")]


@case("query-is-directory", "a query path that is a directory", 2, r"cannot read image .*Is a dir")
def _(ctx: Context) -> list[str]:
    return ["search", str(ctx.run), str(ctx.tmp)]


@case(
    "query-too-large",
    "a query image above the pixel limit (limit lowered to 100 pixels here)",
    2,
    r"20 x 20 pixels is more than the limit of 100",
)
def _(ctx: Context) -> list[str]:
    ctx.monkeypatch.setattr("mbdl.data.files.MAX_PIXELS", 100)
    return ["search", str(ctx.run), ctx.query()]


# -- while training -----------------------------------------------------------------------------


@case(
    "disk-full",
    "the disk fills while a checkpoint is written (simulated: the write raises ENOSPC)",
    2,
    r"checkpoints/\w+\.pt: No space left on device \(the disk is full; free space or choose",
)
def _(ctx: Context) -> list[str]:
    def full(obj: Any, file: Any) -> None:
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(torch, "save", full)
    return ctx.train(ctx.folder())


@case(
    "read-only",
    "out= on a read-only file system (simulated: creating the lock raises EROFS)",
    2,
    r"Read-only file system \(the file system is read-only; choose a writable out=\)",
)
def _(ctx: Context) -> list[str]:
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if not str(path).endswith(RUN_LOCK):  # images and other files read as usual
            return real_open(path, *args, **kwargs)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    ctx.monkeypatch.setattr("mbdl.train.runlock.os.open", read_only)
    return ctx.train(ctx.folder())


@case(
    "out-of-memory",
    "memory runs out in a training step (simulated: torch.OutOfMemoryError)",
    2,
    r"out of memory \(.*\); lower eval\.batch_size, train\.batch_classes",
)
def _(ctx: Context) -> list[str]:
    def oom(self: Any, *args: Any) -> float:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    ctx.monkeypatch.setattr("mbdl.train.trainer.Trainer._train_step", oom)
    return ctx.train(ctx.folder())


@case("live-lock", "out= being trained into by a live process", 2, r"another process \(pid \d+\)")
def _(ctx: Context) -> list[str]:
    out = ctx.tmp / "out"
    out.mkdir()
    (out / RUN_LOCK).write_text(f"{os.uname().nodename} {os.getppid()}")
    import fcntl

    holder = os.open(out / RUN_LOCK, os.O_RDONLY)  # held (flock) as the live holder holds it
    fcntl.flock(holder, fcntl.LOCK_EX)
    _HELD_LOCKS.append(holder)  # released when the test process ends
    return [*ctx.train(ctx.folder()), "resume=true"]


_HELD_LOCKS: list[int] = []


@case("diverged", "the loss becomes NaN", 1, r"the loss is nan at epoch 1, step 1")
def _(ctx: Context) -> list[str]:
    def nan_loss(self: Any, embeddings: Any, labels: Any, *args: Any, **kw: Any) -> Any:
        return embeddings.sum() * float("nan")

    ctx.monkeypatch.setattr("mbdl.distributed.GatheredLoss.forward", nan_loss)
    return ctx.train(ctx.folder())


@case("interrupted", "Ctrl-C during training", 130, r"interrupted; continue with: mbdl train")
def _(ctx: Context) -> list[str]:
    def interrupt(self: Any, *args: Any) -> float:
        raise KeyboardInterrupt

    ctx.monkeypatch.setattr("mbdl.train.trainer.Trainer._train_step", interrupt)
    return ctx.train(ctx.folder())


@case("stale-empty-lock", "an empty .lock left by a writer killed while creating it", 0, r"^$")
def _(ctx: Context) -> list[str]:
    out = ctx.tmp / "out"
    out.mkdir()
    (out / RUN_LOCK).write_text("")
    os.utime(out / RUN_LOCK, (0, 0))
    return [*ctx.train(ctx.folder()), "resume=true"]


# -- running the cases --------------------------------------------------------------------------


def build_run(base: Path) -> tuple[Path, Path]:
    """A finished tiny run (eval.distance=squared_euclidean, documented and accepted) and its
    gallery index."""
    root = make_folder(base / "data", 6, 4)
    run = base / "run"
    argv = ["train", *TINY, f"data.root={root}", f"out={run}", "eval.distance=squared_euclidean"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
        assert main(["index", "build", str(run), "-o", str(base / "gallery.index")]) == 0
    return run, base / "gallery.index"


def run_case(item: Case, ctx: Context) -> tuple[int, str]:
    """Run one case; returns the exit code and what was printed on stderr."""
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        argv = item.make(ctx)
        stderr.seek(0)
        stderr.truncate(0)
        code = main(argv)
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_run(tmp_path_factory.mktemp("errors"))


@pytest.mark.parametrize("item", CASES, ids=[c.name for c in CASES])
def test_failure_mode(
    item: Case, finished: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MBDL_DEBUG", raising=False)
    ctx = Context(tmp_path, finished[0], finished[1], monkeypatch)
    code, err = run_case(item, ctx)
    assert code == item.code, err
    assert "Traceback" not in err and "\x1b" not in err
    if item.code == 0:
        return
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mbdl: error: " if item.code in (1, 2) else "mbdl: interrupted")
    assert re.search(item.message, lines[0]), lines[0]
    if item.before_training:
        assert not (tmp_path / "out" / "checkpoints").exists()
        assert not (tmp_path / "out" / RUN_LOCK).exists()  # a failed start leaves no lock


def test_scan_lists_every_problem_and_the_counts(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", 6, 4)
    (root / "class_1" / "0.png").write_bytes(b"")
    (root / "class_4" / "2.png").write_bytes(b"nope")
    argv = ["scan", *TINY, f"data.root={root}", "--per-class"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 2
        assert main([*argv, "data.skip_corrupt=true"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("data folder: train 11 images / 3 classes, 3-4 per class")
    assert "skipped 2 unreadable" in lines[0]
    assert sum("unreadable: " in line for line in lines) == 4  # both files, in both runs
    assert "  train       3  class_1" in lines and "  test        3  class_4" in lines
    assert err.getvalue().count("\n") == 1


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBDL_DEBUG", "1")
    with pytest.raises(ValueError, match=r"unknown key train\.epoch"):
        main(["train", "train.epoch=5"])


def test_docs_table_lists_every_case() -> None:
    text = (Path(__file__).parents[1] / "docs" / "errors.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| [^|]+ \| (\d+) \|", text, flags=re.MULTILINE)
    assert sorted(rows) == sorted((c.name, str(c.code)) for c in CASES)
    assert f"{len(CASES)} failure modes" in text


def _placeholders(text: str, ctx: Context) -> str:
    for path, name in ((ctx.tmp, "TMP"), (ctx.run.parent, "BASE")):
        text = text.replace(str(path), name)
    return re.sub(r"pid \d+", "pid N", text).replace("|", "\\|").replace("`", "'")


def print_table() -> None:
    """The failure-mode table of docs/errors.md, measured."""
    with tempfile.TemporaryDirectory() as base:
        run, index = build_run(Path(base))
        print("| case | input | exit | message |")
        print("| --- | --- | --- | --- |")
        for number, item in enumerate(CASES):
            scratch = Path(base) / f"case{number}"
            scratch.mkdir()
            monkeypatch = pytest.MonkeyPatch()
            try:
                ctx = Context(scratch, run, index, monkeypatch)
                code, err = run_case(item, ctx)
            finally:
                monkeypatch.undo()
            message = _placeholders(err.strip() or "(trains normally)", ctx)
            print(f"| `{item.name}` | {item.given} | {code} | `{message}` |")


if __name__ == "__main__":
    print_table()


def test_an_error_from_a_loader_worker_is_its_own_one_line_message() -> None:
    from torch.utils.data import DataLoader, Dataset

    from mbdl.data.files import ImageReadError
    from mbdl.errors import one_line

    class Broken(Dataset[int]):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> int:
            raise ImageReadError("cannot read /data/a.png: truncated")

    with pytest.raises(ImageReadError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # torch's wrapping
    assert one_line(caught.value) == "cannot read /data/a.png: truncated"
