"""The one image reader under hostile files: named pipes and devices refused before reading (a
subprocess with a timeout, so a regression hangs no test run), a small 16-bit PNG that decodes
to many pixels scaled in bounded memory, decompression bombs as one line, no PIL warning on
stderr beside mbdl's line, and every inference entry point going through the reader."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_data import make_small_model_dir
from mbdl.data.files import MAX_PIXELS, ImageReadError, inspect_image, read_image

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def mbdl(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mbdl", *argv],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=timeout,  # a reader blocked on a pipe fails here instead of hanging the suite
        check=False,
    )


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` pixels (with valid CRCs) and whose
    data is one tiny compressed row: a decompression bomb's header without its payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_model_dir(tmp_path_factory.mktemp("images-model"))


@pytest.fixture
def pipe_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    os.mkfifo(folder / "pipe.png")  # opening it for reading blocks until a writer comes
    return folder


# -- the reader ---------------------------------------------------------------------------------


def test_a_named_pipe_is_refused_without_blocking(pipe_folder: Path) -> None:
    done = run(
        "import sys; from mbdl.data.files import read_image, inspect_image\n"
        "print(inspect_image(sys.argv[1]))\n"
        "try:\n    read_image(sys.argv[1])\nexcept ValueError as e:\n    print(e)",
        str(pipe_folder / "pipe.png"),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "not a regular file",
        f"cannot read image {pipe_folder / 'pipe.png'}: not a regular file",
    ]


def test_a_directory_and_a_device_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    for path, reason in (
        (tmp_path / "dir.png", "Is a directory"),
        (Path("/dev/zero"), "not a regular file"),
    ):
        assert inspect_image(path) == reason
        with pytest.raises(ImageReadError, match=reason):
            read_image(path)


#: the peak memory growth allowed while reading a 16-bit grey image, per pixel: its decoded
#: 16-bit pixels (2), the 8-bit result (1) and its RGB conversion (3), with slack
BYTES_PER_PIXEL_BOUND = 10

MEASURE = r"""
import resource, sys
from mbdl.data.files import read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = read_image(sys.argv[1], "RGB")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, image.size[0] * image.size[1], image.getpixel((0, 0)))
"""


def test_a_small_16_bit_png_is_scaled_in_bounded_memory(tmp_path: Path) -> None:
    side = 6000
    pixels = np.full((side, side), 65535, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "big16.png")
    del pixels
    assert (tmp_path / "big16.png").stat().st_size < 1 << 20  # a small file, many pixels
    done = run(MEASURE, str(tmp_path / "big16.png"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grown, count, first = done.stdout.split(maxsplit=2)
    assert int(count) == side * side and first.strip() == "(255, 255, 255)"
    assert int(grown) < BYTES_PER_PIXEL_BOUND * side * side, f"{int(grown) >> 20} MiB"


@pytest.mark.parametrize("factor", [1.5, 3])  # PIL warns above MAX_PIXELS, raises above twice
def test_a_decompression_bomb_is_one_line_with_no_warning(tmp_path: Path, factor: float) -> None:
    side = int((MAX_PIXELS * factor) ** 0.5) + 1
    bomb = png_declaring(tmp_path / "bomb.png", side, side)
    done = run(
        "import sys\nfrom mbdl.data.files import read_image, ImageReadError\n"
        "try:\n    read_image(sys.argv[1])\nexcept ImageReadError as e:\n    print(e)",
        str(bomb),
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"cannot read image {bomb}: ") and done.stdout.count("\n") == 1


# -- every inference entry point reads through it -----------------------------------------------


def test_embed_images_refuses_a_pipe_in_one_line(model_dir: Path, pipe_folder: Path) -> None:
    done = mbdl(
        "embed", str(model_dir), "--images", str(pipe_folder.parent), "-o",
        str(pipe_folder.parent.parent / "out.npy"), "--no-progress",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pipe.png" in done.stderr and "not a regular file" in done.stderr
    assert done.stderr.count("\n") == 1


def test_export_images_refuses_a_pipe_and_a_bomb_in_one_line(
    model_dir: Path, pipe_folder: Path, tmp_path: Path
) -> None:
    bomb = png_declaring(tmp_path / "bomb.png", 20_000, 20_000)
    for bad in (pipe_folder / "pipe.png", bomb):
        done = mbdl(
            "export", str(model_dir), "--format", "torchscript", "-o", str(tmp_path / "m.pt"),
            "--images", str(pipe_folder / "0.png"), str(bad),
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith("mbdl: error: ") and bad.name in done.stderr
        assert "cannot read image" in done.stderr
        assert done.stderr.count("\n") == 1
        assert not (tmp_path / "m.pt").exists()


def test_verify_refuses_a_pipe_in_one_line(model_dir: Path, pipe_folder: Path) -> None:
    try:
        done = mbdl("verify", str(model_dir), str(pipe_folder / "0.png"),
                    str(pipe_folder / "pipe.png"), "--threshold", "0.5", timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("mbdl verify blocked on a named pipe")
    assert done.returncode == 2 and "not a regular file" in done.stderr


@pytest.mark.parametrize("threshold", ["-1", "-0.001", "nan", "inf"])
def test_verify_refuses_a_threshold_that_is_no_distance(
    model_dir: Path, pipe_folder: Path, threshold: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mbdl.cli import main

    first, second = pipe_folder / "0.png", pipe_folder / "1.png"
    assert main(["verify", str(model_dir), str(first), str(second), "--threshold", threshold]) == 2
    err = capsys.readouterr().err
    assert "threshold must be" in err and "finite" in err and err.count("\n") == 1
