"""The one writing helper under faults: a real file system that fills (a 2 MiB tmpfs, where
this machine lets us mount one), a writer SIGKILLed at each step of a commit, permissions of an
overwritten file, targets that are not mbdl's own output. Each time: one error line naming the
file, the previous output intact, no temporary file left (after the next write at the latest)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import make_small_model_dir
from mbdl.embedstore import ImageFiles, embed_to_files, load_embeddings, output_paths
from mbdl.errors import UserError, one_line
from mbdl.export import save_pretrained
from mbdl.fileio import (
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    commit_files,
    finish_commit,
    journal_path,
    read_json_bounded,
)
from mbdl.train.checkpoint import atomic_torch_save

SLOW_ONLY = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MBDL_SLOW", "") in ("", "0"), reason="set MBDL_SLOW=1"),
]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def debris(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_model_dir(tmp_path_factory.mktemp("writes"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("write-images")
    rng = np.random.default_rng(0)
    for i in range(12):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 3}" / f"{i}.png")
    return root


# -- a disk that fills ---------------------------------------------------------------------------


def test_a_full_disk_keeps_the_old_file_its_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mount:
        target = mount / "out.bin"
        target.write_bytes(b"old")
        target.chmod(0o640)
        with pytest.raises(OSError) as caught:
            atomic_write_bytes(target, bytes(4 << 20))
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert "out.bin: No space left on device" in one_line(caught.value)
        assert target.read_bytes() == b"old" and target.stat().st_mode & 0o777 == 0o640
        assert debris(mount) == []


def test_torch_save_on_a_full_disk_is_an_os_error_naming_the_checkpoint(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt") as mount:
        target = mount / "last.pt"
        atomic_torch_save({"weights": torch.zeros(10)}, target)
        with pytest.raises(OSError) as caught:  # torch's zip writer raises RuntimeError
            atomic_torch_save({"weights": torch.zeros(1 << 20)}, target)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert torch.equal(torch.load(target)["weights"], torch.zeros(10))
        assert debris(mount) == []


def test_embed_on_a_full_disk_keeps_the_previous_output(
    tmp_path: Path, model_dir: Path, images: Path
) -> None:
    from mbdl.export import load_embedder

    model, transform = load_embedder(model_dir)
    dataset = ImageFiles(images, transform)
    with tmpfs(tmp_path / "mnt") as mount:
        output = mount / "gallery.npy"
        embed_to_files(model, dataset, output, dim=8, progress=False)
        before = {name: path.read_bytes() for name, path in output_paths(output).items()}
        filler = mount / "filler"
        with open(filler, "wb") as file, contextlib.suppress(OSError):
            while True:
                file.write(bytes(64 << 10))
                file.flush()
        with pytest.raises(OSError) as caught:
            embed_to_files(model, dataset, output, dim=8, progress=False)
        assert caught.value.errno == errno.ENOSPC
        after = {name: path.read_bytes() for name, path in output_paths(output).items()}
        assert after == before
        assert debris(mount) == []
        filler.unlink()
        embed_to_files(model, dataset, output, dim=8, progress=False)  # the re-run succeeds
        assert len(load_embeddings(output)[0]) == 12


EXPORT_FULL = r"""
import sys, torch
from mbdl.export import check_images, export_file
model, images, out, fmt = sys.argv[1:5]
try:
    export_file(model, out, fmt, check_images(model, [images + "/c0/0.png", images + "/c1/1.png"]))
except OSError as error:
    from mbdl.errors import one_line
    print(one_line(error))
    sys.exit(2)
"""


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_on_a_full_disk_fails_cleanly(
    tmp_path: Path, model_dir: Path, images: Path, fmt: str
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    with tmpfs(tmp_path / "mnt", "256k") as mount:
        target = mount / "model.pt"
        target.write_bytes(b"previous export")
        done = subprocess.run(
            [sys.executable, "-c", EXPORT_FULL, str(model_dir), str(images), str(target), fmt],
            env={**os.environ, "PYTHONPATH": SRC},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 2, done.stderr[-2000:]  # not SIGABRT (-6)
        assert "model.pt: No space left on device" in done.stdout, done.stdout
        assert target.read_bytes() == b"previous export"
        assert debris(mount) == []


# -- killed at each step of a commit ------------------------------------------------------------

#: embed into an existing output, SIGKILLing itself at its N-th os.replace: 0 is the journal
#: (the commit point), 1 to 4 the moves of the four files
KILLED_EMBED = r"""
import os, signal, sys
from mbdl.embedstore import ImageFiles, embed_to_files
from mbdl.export import load_embedder
model_dir, images, output, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model, transform = load_embedder(model_dir)
dataset = ImageFiles(images, transform)
dataset.paths = dataset.paths[: int(sys.argv[5])]
replace, calls = os.replace, [0]
def killing_replace(*args, **kwargs):
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
    return replace(*args, **kwargs)
os.replace = killing_replace
embed_to_files(model, dataset, output, dim=8, progress=False)
"""


@pytest.mark.parametrize(
    "kill_at",
    [0, 1, pytest.param(2, marks=SLOW_ONLY), 3, pytest.param(4, marks=SLOW_ONLY)],
)
def test_an_embed_killed_at_each_step_leaves_old_or_new_never_a_mix(
    tmp_path: Path, model_dir: Path, images: Path, kill_at: int
) -> None:
    output = tmp_path / "gallery.npy"
    model, transform = load_embedder_cached(model_dir)
    dataset = ImageFiles(images, transform)
    dataset.paths = dataset.paths[:5]
    embed_to_files(model, dataset, output, dim=8, progress=False)  # the old output: 5 items
    argv = [sys.executable, "-c", KILLED_EMBED, str(model_dir), str(images), str(output)]
    done = subprocess.run(
        [*argv, str(kill_at), "9"], env={**os.environ, "PYTHONPATH": SRC}, timeout=300, check=False
    )
    assert done.returncode == -signal.SIGKILL  # it really was killed
    embeddings, labels, paths, info = load_embeddings(output)  # finishes a committed write
    assert len(embeddings) == len(labels) == len(paths) == info["count"]
    # the journal is written with the 1st os.replace: killed there, the old output is kept
    assert info["count"] == (5 if kill_at == 0 else 9)
    embed_to_files(model, dataset, output, dim=8, progress=False)  # the re-run
    assert load_embeddings(output)[3]["count"] == 5
    assert debris(tmp_path) == []


_EMBEDDERS: dict[Path, object] = {}


def load_embedder_cached(model_dir: Path):  # type: ignore[no-untyped-def]
    from mbdl.export import load_embedder

    if model_dir not in _EMBEDDERS:
        _EMBEDDERS[model_dir] = load_embedder(model_dir)
    return _EMBEDDERS[model_dir]


def test_a_killed_cli_embed_is_cleaned_up_by_the_next_run(
    tmp_path: Path, model_dir: Path, images: Path
) -> None:
    output = tmp_path / "gallery.npy"
    argv = [sys.executable, "-m", "mbdl", "embed", str(model_dir), "--images", str(images)]
    argv += ["-o", str(output)]
    env = {**os.environ, "PYTHONPATH": SRC}
    assert subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode == 0
    before = {name: path.read_bytes() for name, path in output_paths(output).items()}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]:
        assert process.poll() is None, "the embed ended before its temporary files appeared"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    after = {name: path.read_bytes() for name, path in output_paths(output).items()}
    assert after == before  # killed before its commit point: the old output
    assert subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode == 0
    assert debris(tmp_path) == []  # the dead writer's temporary files are gone


# -- what is replaced ---------------------------------------------------------------------------


def test_an_overwritten_files_permissions_are_kept_not_widened(tmp_path: Path) -> None:
    target = tmp_path / "secret.json"
    target.write_text("{}")
    target.chmod(0o600)
    atomic_write_bytes(target, b"[1]")
    assert target.stat().st_mode & 0o777 == 0o600 and read_json_bounded(target) == [1]


def test_a_target_that_is_not_mbdls_output_is_refused(
    tmp_path: Path, model_dir: Path, images: Path
) -> None:
    notes = tmp_path / "notes.npy"
    notes.write_text("my notes")
    model, transform = load_embedder_cached(model_dir)
    with pytest.raises(UserError, match="is not an embeddings file"):
        embed_to_files(model, ImageFiles(images, transform), notes, dim=8, progress=False)
    assert notes.read_text() == "my notes"
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.jsonl").write_text("{}")
    with pytest.raises(ValueError, match="is not an mbdl model directory"):
        save_pretrained(model_dir, folder)
    assert (folder / "log.jsonl").read_text() == "{}"
    with (
        pytest.raises(UserError, match="refusing to replace"),
        atomic_directory(folder, owned=lambda _: False),
    ):
        pass
    assert debris(tmp_path) == []


def test_a_writer_that_fails_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "report.txt"
    target.write_text("old")

    def failing(file: object) -> None:
        raise RuntimeError("writer exploded\n" + "x" * 10_000)

    with pytest.raises(OSError) as caught:
        atomic_write(target, failing)
    message = one_line(caught.value)
    assert "report.txt" in message and "writer exploded" in message and len(message) < 400
    assert target.read_text() == "old" and debris(tmp_path) == []


def test_a_directory_swapped_in_replaces_the_old_one_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with atomic_directory(target, owned=lambda p: (p / "a").exists()) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(OSError, match="KeyError: 'failed midway'"):
        with atomic_directory(target, owned=lambda p: True) as staging:
            (staging / "c").write_text("3")
            raise KeyError("failed midway")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and debris(tmp_path) == []


#: re-export a model directory, SIGKILLing itself just before or just after the atomic exchange
KILLED_SAVE = r"""
import os, signal, sys
from mbdl import fileio
from mbdl.export import save_pretrained
source, target, when = sys.argv[1:4]
real = fileio.exchange
def killing_exchange(first, second):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    swapped = real(first, second)
    os.kill(os.getpid(), signal.SIGKILL)
fileio.exchange = killing_exchange
save_pretrained(source, target, name="new")
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_model_directory_killed_at_its_swap_is_whole(
    tmp_path: Path, model_dir: Path, when: str
) -> None:
    from mbdl.export import load_state

    target = tmp_path / "model"
    save_pretrained(model_dir, target, name="old")
    done = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(model_dir), str(target), when],
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=300,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL  # it really was killed
    name = load_state(target)["model_dir"]["name"]  # a whole directory, old or new
    assert name == ("old" if when == "before" else "new")
    assert debris(tmp_path) != []  # the dead writer's staging directory
    save_pretrained(model_dir, target, name="again")  # the re-run cleans it up
    assert load_state(target)["model_dir"]["name"] == "again" and debris(tmp_path) == []


def test_a_commit_journal_names_only_files_beside_its_anchor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths (as a command line gives them) commit, and a journal that would move a
    file from or to another folder is refused."""
    monkeypatch.chdir(tmp_path)
    Path("a.tmp").write_text("new")
    commit_files({tmp_path / "a.tmp": Path("a.txt")}, Path("a.txt"))  # temporaries: absolute
    assert Path("a.txt").read_text() == "new" and not journal_path(Path("a.txt")).exists()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("keep")
    for temp, final in (("../outside/secret", "b.txt"), ("b.tmp", "../outside/secret")):
        journal_path(Path("b.txt")).write_text(json.dumps({"moves": [[temp, final]]}))
        with pytest.raises(UserError, match="outside its folder"):
            finish_commit(Path("b.txt"))
    assert (tmp_path / "outside" / "secret").read_text() == "keep"
