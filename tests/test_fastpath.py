"""The fast data path: reduced JPEG decoding (mbdl.data.decode) and the evaluation transform by
uint8 batches (mbdl.data.fastpath)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbdl.data.decode import jpeg_reduction, read_image_reduced
from mbdl.data.fastpath import EvaluationImages, embed_images, evaluation_loader, normalise_batch
from mbdl.data.files import ImageReadError, read_image
from mbdl.evaluate import embed_dataset
from mbdl.model.preprocessing import transform_from_spec

SPEC = {
    "color_mode": "RGB",
    "resize": 73,
    "crop": 64,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients with a little noise: JPEG-like content."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    noisy = smooth.astype(np.int16) + rng.integers(-3, 4, smooth.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("photos")
    paths = {
        "small_jpeg": root / "small.jpg",  # shorter side 90 < 2 * 73: decoded in full
        "large_jpeg": root / "large.jpg",  # shorter side 300: decoded at 1/2
        "png": root / "large.png",  # not a JPEG: decoded in full
        "grey_jpeg": root / "grey.jpg",
    }
    photo(120, 90, 0).save(paths["small_jpeg"], quality=90)
    photo(400, 300, 1).save(paths["large_jpeg"], quality=90)
    photo(400, 300, 2).save(paths["png"])
    photo(400, 300, 3).convert("L").save(paths["grey_jpeg"], quality=90)
    return paths


def test_jpeg_reduction_keeps_the_shorter_side() -> None:
    assert jpeg_reduction(500, 375, 256) == 1
    assert jpeg_reduction(1000, 750, 256) == 2
    assert jpeg_reduction(2048, 1536, 192) == 8
    assert jpeg_reduction(1000, 511, 256) == 2  # libjpeg rounds up: ceil(511 / 2) = 256
    assert jpeg_reduction(1000, 510, 256) == 1
    assert jpeg_reduction(40, 30, 256) == 1


def test_reduced_decoding_is_exact_where_no_reduction_applies(images: dict[str, Path]) -> None:
    for name in ("small_jpeg", "png"):
        exact = np.asarray(read_image(images[name]))
        assert np.array_equal(np.asarray(read_image_reduced(images[name], "RGB", 73)), exact)
    large = np.asarray(read_image(images["large_jpeg"]))
    assert np.array_equal(np.asarray(read_image_reduced(images["large_jpeg"], "RGB")), large)


def test_reduced_decoding_shrinks_large_jpegs_close_to_the_full_decode(
    images: dict[str, Path],
) -> None:
    reduced = read_image_reduced(images["large_jpeg"], "RGB", 73)  # 300 / 4 = 75 >= 73
    assert reduced.size == (100, 75) and reduced.mode == "RGB"
    full = read_image(images["large_jpeg"]).resize((100, 75), Image.Resampling.BILINEAR)
    difference = np.abs(np.asarray(reduced, np.int16) - np.asarray(full, np.int16))
    assert 0 < difference.mean() < 2.0
    assert read_image_reduced(images["large_jpeg"], "RGB", 150).size == (200, 150)
    grey = read_image_reduced(images["grey_jpeg"], "RGB", 73)
    assert grey.size == (100, 75) and grey.mode == "RGB"


def test_reduced_decoding_keeps_the_reader_checks(tmp_path: Path, images: dict[str, Path]) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images["large_jpeg"].read_bytes()[:200])
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        read_image_reduced(broken, "RGB", 73)
    with pytest.raises(ImageReadError, match="not found"):
        read_image_reduced(tmp_path / "missing.jpg", "RGB", 73)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image_reduced(fifo, "RGB", 73)


def test_batches_are_the_evaluation_transform_bit_for_bit(images: dict[str, Path]) -> None:
    paths = list(images.values())
    dataset = EvaluationImages(paths, SPEC, labels=[0, 1, 2, 3])
    transform = transform_from_spec(SPEC)
    expected = torch.stack([transform(read_image(p)) for p in paths])
    loaded, labels = next(iter(evaluation_loader(dataset, batch_size=8)))
    assert loaded.dtype == torch.uint8 and loaded.shape == (4, 3, 64, 64)
    assert labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(normalise_batch(loaded, SPEC["mean"], SPEC["std"]), expected)
    assert all(torch.equal(dataset.normalised(i), expected[i]) for i in range(4))
    grey = {**SPEC, "color_mode": "L", "mean": [0.449], "std": [0.226]}
    one = EvaluationImages(paths[:1], grey).image(0)
    assert one.shape == (1, 64, 64)
    assert torch.equal(
        normalise_batch(one[None], grey["mean"], grey["std"])[0],
        transform_from_spec(grey)(read_image(paths[0], "L")),
    )

    bicubic = {**SPEC, "interpolation": "bicubic"}  # weights trained with another resize
    for exact in (True, False):  # the fast bilinear resize never stands in for it
        cubic = EvaluationImages(paths, bicubic, exact=exact)
        for i, path in enumerate(paths):
            assert torch.equal(cubic.normalised(i), transform_from_spec(bicubic)(read_image(path)))


def test_inexact_batches_are_within_a_level_unscaled_and_close_scaled(
    images: dict[str, Path],
) -> None:
    exact = EvaluationImages([images["small_jpeg"], images["large_jpeg"]], SPEC)
    fast = EvaluationImages([images["small_jpeg"], images["large_jpeg"]], SPEC, exact=False)
    # no DCT scaling: only the resize differs, by at most one level on a few values
    difference = (fast.image(0).float() - exact.image(0).float()).abs()
    assert fast.image(0).shape == (3, 64, 64) and difference.max() <= 1
    assert (difference > 0).float().mean() < 0.02
    difference = (fast.image(1).float() - exact.image(1).float()).abs()
    assert 0 < difference.mean() < 2.0


def test_embed_images_equals_embedding_the_transformed_images(images: dict[str, Path]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    )
    model.train()
    paths = list(images.values())
    dataset = EvaluationImages(paths, SPEC, labels=[3, 2, 1, 0])
    transform = transform_from_spec(SPEC)
    reference = [
        (transform(read_image(p)), label) for p, label in zip(paths, [3, 2, 1, 0], strict=True)
    ]
    expected, expected_labels = embed_dataset(model, reference, batch_size=3)
    embeddings, labels = embed_images(model, dataset, SPEC, batch_size=3)
    assert model.training  # its mode restored
    assert np.array_equal(embeddings, expected.numpy())
    assert labels.tolist() == expected_labels.tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="no images"):
        embed_images(model, EvaluationImages([], SPEC), SPEC)


def test_read_array_gives_the_readers_pixels(
    tmp_path: Path, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbdl.data import decode

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo(120, 90, 5).save(rotated, quality=90, exif=exif.tobytes())
    cases = [
        (images["small_jpeg"], "RGB"),
        (images["grey_jpeg"], "RGB"),
        (images["grey_jpeg"], "L"),
        (images["small_jpeg"], "L"),  # colour to grey: PIL's conversion
        (images["png"], "RGB"),
        (rotated, "RGB"),
    ]
    calls: list[int] = []
    decoder = decode._torchvision_decoder()
    assert decoder is not None

    def counting(data: object, **options: object) -> object:
        calls.append(1)
        return decoder[0](data, **options)

    monkeypatch.setattr(decode, "_torchvision_decoder", lambda: (counting, decoder[1]))
    for path, mode in cases:
        expected = np.asarray(read_image(path, mode))
        array = decode.read_array(path, mode)
        assert array.dtype == np.uint8 and array.shape[2] == (3 if mode == "RGB" else 1)
        assert np.array_equal(array.reshape(expected.shape), expected), (path.name, mode)
    assert decode.read_array(rotated).shape == (120, 90, 3)  # EXIF orientation applied
    assert len(calls) == 5  # the JPEGs, except colour read as grey
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images["small_jpeg"].read_bytes()[:-400])
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        decode.read_array(broken)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_shows_the_image_as_the_reader_does(tmp_path: Path, orientation: int) -> None:
    """The EXIF orientation the GPU decoding applies itself (torchvision's GPU decoder does not):
    the stored pixels turned by :func:`orient` are the checked reader's, bit for bit."""
    from mbdl.data.decode import _torchvision_decoder, exif_orientation, orient

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    photo(40, 24, orientation).save(path, quality=95, exif=exif.tobytes())
    assert exif_orientation(path) == orientation
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    decoder = _torchvision_decoder()
    assert decoder is not None
    stored = decoder[0](data, mode=decoder[1].RGB, apply_exif_orientation=False)
    shown = orient(stored, orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(shown, np.asarray(read_image(path)))
