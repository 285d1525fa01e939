"""Decoding arbitrary image files to 8-bit RGB, quarantine reasons, and crops."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.images import RejectedImage, decode_png, decode_rgb, derive_seed, encode_png, random_crops
from tests.support import encode, photo

LIMITS = {"max_pixels": 4_000_000, "min_side": 64}


def test_exif_orientation_is_applied():
    image = photo(100, 200)
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", exif=exif, quality=95)
    decoded = decode_rgb(buffer.getvalue(), **LIMITS)
    assert decoded.shape == (200, 100, 3)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_other_modes_become_rgb(mode):
    image = Image.fromarray(photo(80, 90)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode_rgb(encode(np.asarray(image), fmt) if mode in ("L", "RGBA", "LA") else _save(image, fmt),
                         **LIMITS)
    assert decoded.dtype == np.uint8 and decoded.shape == (80, 90, 3)
    assert decoded.std() > 10


def _save(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((70, 70, 4), np.uint8)
    rgba[..., 0] = 200
    decoded = decode_rgb(encode(rgba, "PNG"), **LIMITS)
    assert (decoded == 255).all()


def test_16_bit_images_are_scaled_to_8_bit(tmp_path):
    grey16 = (np.linspace(0, 65535, 80 * 80).reshape(80, 80)).astype(np.uint16)
    decoded = decode_rgb(cv2.imencode(".png", grey16)[1].tobytes(), **LIMITS)
    assert decoded.shape == (80, 80, 3) and decoded.min() == 0 and decoded.max() == 255
    rgb16 = (photo(80, 80).astype(np.uint16) * 257)
    for ext in (".png", ".tiff"):
        data = cv2.imencode(ext, rgb16[..., ::-1])[1].tobytes()
        decoded = decode_rgb(data, **LIMITS)
        assert np.abs(decoded.astype(int) - photo(80, 80).astype(int)).max() <= 1, ext


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not a decodable image"),
    (encode(photo(50, 300), "PNG"), "too small"),
    (encode(photo(2100, 2100), "JPEG"), "too many pixels"),
])
def test_unusable_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(RejectedImage, match=reason):
        decode_rgb(data, **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected(fmt):
    data = encode(photo(300, 300), fmt)
    with pytest.raises(RejectedImage, match="truncated|not a decodable"):
        decode_rgb(data[: len(data) // 2], **LIMITS)


def test_small_sides_are_reflect_padded_and_crops_are_deterministic():
    image = photo(100, 300)
    crops = random_crops(image, 3, 256, seed=derive_seed(0, "a.png"))
    again = random_crops(image, 3, 256, seed=derive_seed(0, "a.png"))
    assert [(x, y) for x, y, _ in crops] == [(x, y) for x, y, _ in again]
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(crops, again))
    assert len({x for x, _, _ in crops}) > 1  # positions are drawn, not fixed
    for x, y, crop in crops:
        assert crop.shape == (256, 256, 3) and y == 0
        np.testing.assert_array_equal(crop[:100], image[:, x:x + 256])
        np.testing.assert_array_equal(crop[100:102], image[98:96:-1, x:x + 256])  # reflect without the edge row
    assert derive_seed(0, "a.png") != derive_seed(0, "b.png")


def test_png_round_trip_is_lossless_at_every_level():
    image = photo(64, 48)
    for level in (0, 1, 9):
        assert np.array_equal(decode_png(encode_png(image, level)), image), level
    # The run-length strategy ignores the level above 0; level 0 stores the rows uncompressed.
    assert encode_png(image, 1) == encode_png(image, 9)
    assert len(encode_png(image, 0)) > len(encode_png(image, 1))
