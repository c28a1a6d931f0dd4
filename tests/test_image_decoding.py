"""The decoding table of mbdl.data.files (16-bit, palette, alpha, CMYK, EXIF, animation), the
up-front image checks, and the folder source's rules for links, duplicates and the root."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_data import write_image
from mbdl.data import files
from mbdl.data.files import (
    BACKGROUND,
    DECODING,
    ImageReadError,
    inspect_image,
    read_image,
    to_mode,
)
from mbdl.data.folder import load_splits, scan_folder
from mbdl.errors import UserError

# -- the decoding table -------------------------------------------------------------------------


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    gradient = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as opened:
        assert opened.mode == "I;16"  # what Pillow makes of a 16-bit PNG
    grey = np.asarray(read_image(tmp_path / "g16.png", "L"))
    expected = np.round(gradient / 257.0).astype(np.uint8)  # the formula, per pixel
    np.testing.assert_array_equal(grey, expected)
    assert (grey == 255).mean() < 0.01  # Pillow's own convert("L") made 99.6% white
    assert len(np.unique(grey)) == 256
    rgb = np.asarray(read_image(tmp_path / "g16.png", "RGB"))
    np.testing.assert_array_equal(rgb[..., 0], expected)


def test_big_endian_and_32_bit_integer_grey() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=">u2")
    big = Image.frombytes("I;16B", (4, 1), values.tobytes())
    np.testing.assert_array_equal(np.asarray(to_mode(big, "L")), [[0, 1, 128, 255]])
    wide = Image.fromarray(np.array([[-5, 514, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_mode(wide, "L")), [[0, 2, 255, 255]])


def test_alpha_is_composited_on_the_stated_background() -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black
    out = np.asarray(to_mode(Image.fromarray(rgba, "RGBA"), "RGB")).astype(int)
    assert BACKGROUND == (255, 255, 255)
    np.testing.assert_array_equal(out[0, 0], (0, 0, 0))
    np.testing.assert_array_equal(out[0, 1], BACKGROUND)
    assert np.all(np.abs(out[0, 2] - 127) <= 1)  # 255 * (1 - 128/255)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(to_mode(la, "L")), [[255, 0]])
    # premultiplied alpha: un-premultiplied, then composited the same way
    np.testing.assert_array_equal(np.asarray(to_mode(la.convert("La"), "L")), [[255, 0]])
    rgba_pre = Image.fromarray(rgba, "RGBA").convert("RGBa")
    out = np.asarray(to_mode(rgba_pre, "L")).astype(int)
    assert out[0, 0] == 0 and out[0, 1] == 255 and abs(out[0, 2] - 127) <= 1


def test_16_bit_colour_keeps_the_high_bytes(tmp_path: Path) -> None:
    pixels = np.array([[[65535, 32896, 257], [256, 255, 0]]], dtype=">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter byte 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)  # 2 x 1, 16 bits, colour
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    (tmp_path / "c16.png").write_bytes(png)
    out = np.asarray(read_image(tmp_path / "c16.png", "RGB"))
    np.testing.assert_array_equal(out, [[[255, 128, 1], [1, 0, 0]]])  # value >> 8


def test_palette_with_a_transparent_index(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    out = np.asarray(read_image(tmp_path / "p.png", "RGB"))
    np.testing.assert_array_equal(out[0, 0], BACKGROUND)  # transparent red -> background
    np.testing.assert_array_equal(out[0, 1], (0, 0, 255))
    opaque = Image.new("P", (1, 1))
    opaque.putpalette([10, 200, 30] + [0] * 765)
    np.testing.assert_array_equal(np.asarray(to_mode(opaque, "RGB"))[0, 0], (10, 200, 30))


def test_cmyk_one_bit_and_other_colour_spaces(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    cmyk.save(tmp_path / "c.jpg", quality=100)
    out = np.asarray(read_image(tmp_path / "c.jpg", "RGB")).astype(int)
    assert out[0, 0].min() > 240 and out[0, 1].max() < 15  # white paper, black ink
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    np.testing.assert_array_equal(np.asarray(to_mode(bits, "L")), [[0, 255]])
    ycbcr = Image.new("RGB", (1, 1), (200, 100, 50)).convert("YCbCr")
    assert np.abs(np.asarray(to_mode(ycbcr, "RGB")).astype(int) - (200, 100, 50)).max() <= 2


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high; top-left pixel red
    pixels[0, 0] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "o.png", exif=exif)
    shown = np.asarray(read_image(tmp_path / "o.png", "RGB"))
    assert shown.shape == (4, 2, 3)
    np.testing.assert_array_equal(shown[0, 1], (255, 0, 0))  # top-left went to top-right


def test_animated_images_give_their_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (3, 3), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "a.gif") as opened:
        assert opened.n_frames == 2
    assert np.asarray(read_image(tmp_path / "a.gif", "RGB"))[1, 1].tolist() == [255, 0, 0]


def test_float_images_are_refused_up_front(tmp_path: Path) -> None:
    Image.fromarray(np.ones((2, 2), dtype=np.float32)).save(tmp_path / "f.tif")
    assert "mode F is not supported" in str(inspect_image(tmp_path / "f.tif"))
    with pytest.raises(ImageReadError, match=r"f\.tif: pixel mode F is not supported"):
        read_image(tmp_path / "f.tif")
    assert "F" not in DECODING


def test_size_limit_is_checked_from_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("L", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(files, "MAX_PIXELS", 1000)
    decoded: list[bool] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(True))
    assert "40 x 30 pixels is more than the limit of 1000" in str(
        inspect_image(tmp_path / "big.png")
    )
    with pytest.raises(ImageReadError, match="more than the limit"):
        read_image(tmp_path / "big.png")
    assert not decoded  # refused before any pixel was decoded


def test_non_regular_empty_truncated_and_missing_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block forever
    assert inspect_image(tmp_path / "pipe.png") == "not a regular file"
    (tmp_path / "empty.png").write_bytes(b"")
    assert inspect_image(tmp_path / "empty.png") == "empty file"
    write_image(tmp_path / "ok.jpg", 1)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert inspect_image(tmp_path / "ok.jpg") is None
    assert "truncated" in str(inspect_image(tmp_path / "cut.jpg")).lower()
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    assert inspect_image(tmp_path / "dangling.png") == "file not found (broken symbolic link)"


# -- folder rules -------------------------------------------------------------------------------


def make_folder(root: Path, classes: int = 4, per_class: int = 3) -> Path:
    for c in range(classes):
        for i in range(per_class):
            write_image(root / f"class{c}" / f"{i}.png", 10 * c + i, fmt="PNG")
    return root


def test_a_linked_file_in_its_own_class_counts_once(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    os.symlink(root / "class0" / "0.png", root / "class0" / "alias.png")
    os.symlink(root / "class0", root / "class0" / "loop")  # a folder loop
    paths, classes, duplicates = scan_folder(root)
    assert classes.count("class0") == 3 and len(paths) == 12
    assert duplicates == ["class0/alias.png (same file as class0/0.png)"]  # the loop: walked once
    with pytest.warns(UserWarning, match="counted 1 file"):
        splits = load_splits(root, image_size=8, val_fraction=0.0)
    assert splits.info is not None and len(splits.info["duplicates"]) == 1
    every = [d.describe(i) for d in (splits.train, splits.test) for i in range(len(d))]
    real = [os.path.realpath(p) for p in every]
    assert len(real) == len(set(real)) == 12  # no file twice, so no file in two splits


def test_a_file_in_two_classes_is_refused(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    os.symlink(root / "class0" / "0.png", root / "class3" / "x.png")
    with pytest.raises(UserError, match=r"class3/x\.png \(class 'class3'\) and class0/0\.png"):
        load_splits(root, image_size=8)


def test_links_outside_the_root_are_refused_unless_allowed(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    write_image(tmp_path / "elsewhere" / "e.png", 99, fmt="PNG")
    os.symlink(tmp_path / "elsewhere" / "e.png", root / "class1" / "e.png")
    with pytest.raises(UserError, match=r"outside the data root .*allow_outside_root=true"):
        load_splits(root, image_size=8)
    splits = load_splits(root, image_size=8, val_fraction=0.0, allow_outside_root=True)
    assert len(splits.train) + len(splits.test) == 13
    os.unlink(root / "class1" / "e.png")
    os.symlink(tmp_path / "elsewhere", root / "class9")  # a whole class folder outside
    with pytest.raises(UserError, match="class9 resolves to"):
        load_splits(root, image_size=8)


def test_a_bad_file_in_a_folder_stops_before_training(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    os.mkfifo(root / "class2" / "pipe.png")
    with pytest.raises(ImageReadError, match=r"pipe\.png \(not a regular file\); 1 of 13"):
        load_splits(root, image_size=8)
    with pytest.warns(UserWarning, match="skipped 1"):
        splits = load_splits(root, image_size=8, val_fraction=0.0, skip_corrupt=True)
    assert splits.info is not None and splits.info["skipped"] == 1


def test_splits_never_share_a_file_in_any_source(tmp_path: Path) -> None:
    from mbdl.data import load_splits as load_any

    rows = ["path,label,split"]
    for c in range(4):
        for k in range(2):
            write_image(tmp_path / f"{c}_{k}.png", 10 * c + k, fmt="PNG")
            rows.append(f"{c}_{k}.png,bird {c},{'train' if c < 2 else 'test'}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert len(load_any("csv", tmp_path / "list.csv", image_size=8, val_fraction=0).test) == 4
    os.symlink(tmp_path / "0_0.png", tmp_path / "alias.png")  # a training image, again
    (tmp_path / "list.csv").write_text("\n".join([*rows, "alias.png,bird 3,test"]) + "\n")
    with pytest.raises(UserError, match=r"alias\.png \(test\) and \S*0_0\.png \(train\) are the"):
        load_any("csv", tmp_path / "list.csv", image_size=8, val_fraction=0)
