import io

import cv2
import numpy as np
import pytest
from conftest import BMP_TOO_WIDE, PNG_CHUNK_BOMB, phone_jpeg
from PIL import Image

from maskwatch.preprocessing import (CropSpec, ImageDecodeError, PixelLimitError, crop_box, decode_image, images_in,
                                     extract_face, read_image, visible_files)


def test_crop_box_adds_margin_and_squares():
    # 20x40 box centred at (50, 50): margin 0.25 -> half sizes 15 x 30 -> square 30.
    assert crop_box((40, 30, 60, 70), 200, 200, margin=0.25, square=True) == (20, 20, 80, 80)
    assert crop_box((40, 30, 60, 70), 200, 200, margin=0.0, square=False) == (40, 30, 60, 70)


def test_crop_box_clips_to_the_photo():
    assert crop_box((0, 0, 10, 10), 50, 40, margin=0.5, square=True) == (0, 0, 15, 15)
    assert crop_box((45, 35, 50, 40), 50, 40, margin=1.0, square=True) == (40, 30, 50, 40)


def test_crop_box_never_empty_on_the_edge():
    x0, y0, x1, y1 = crop_box((50, 40, 50, 40), 50, 40, margin=0.0, square=True)
    assert x1 > x0 and y1 > y0


def test_extract_face_shape_dtype_and_content():
    image = np.zeros((100, 100, 3), np.uint8)
    image[40:60, 40:60] = (255, 0, 0)
    face = extract_face(image, (40, 40, 60, 60), CropSpec(margin=0.0, size=32))
    assert face.shape == (32, 32, 3) and face.dtype == np.uint8
    assert (face[..., 0] > 250).all() and (face[..., 1] < 5).all()


def test_decode_png_rgba_and_jpeg_give_rgb():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 255  # red in OpenCV's BGRA
    rgba[..., 3] = 128
    ok, png = cv2.imencode(".png", rgba)
    rgb = decode_image(png.tobytes())
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == 255).all()


def _encoded(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_decode_turns_a_phone_photo_upright_by_its_exif_orientation(data_dir):
    """Phones store photos sideways with an EXIF orientation tag; the face detector needs them upright."""
    photo = Image.open(data_dir / "images" / "maksssksksss10.jpg").convert("RGB")
    stored_as_is = decode_image(_encoded(photo, "JPEG", quality=95))
    upright = decode_image(phone_jpeg(photo))
    assert upright.shape == (photo.width, photo.height, 3)
    np.testing.assert_array_equal(upright, np.rot90(stored_as_is, k=-1))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16"])
def test_decode_gives_8_bit_rgb_whatever_the_colour_mode(data_dir, mode):
    photo = Image.open(data_dir / "images" / "maksssksksss10.jpg").convert("RGB")
    reference = np.asarray(photo).astype(int)
    if mode == "I;16":  # 16-bit PNG, as scanners and some cameras write
        data = cv2.imencode(".png", cv2.cvtColor(np.asarray(photo).astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))[1]
        data = data.tobytes()
    else:
        data = _encoded(photo.convert(mode), "JPEG" if mode == "CMYK" else "PNG")
    decoded = decode_image(data)
    assert decoded.shape == reference.shape and decoded.dtype == np.uint8
    if mode in ("CMYK", "I;16"):  # same colours (CMYK through JPEG: within its rounding)
        assert np.abs(decoded.astype(int) - reference).mean() < 3
    else:  # grey or a 256-colour palette: every channel carries the picture
        assert np.corrcoef(decoded[..., 1].ravel(), reference[..., 1].ravel())[0, 1] > 0.9


@pytest.mark.parametrize("payload", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_decode_rejects_non_images(payload):
    with pytest.raises(ImageDecodeError):
        decode_image(payload)


def test_decode_rejects_truncated_jpeg(data_dir):
    data = (data_dir / "images" / "maksssksksss0.jpg").read_bytes()
    with pytest.raises(ImageDecodeError):
        decode_image(data[:200])


def test_a_png_chunk_longer_than_the_file_is_refused_before_decoding(data_dir):
    with pytest.raises(ImageDecodeError, match="chunk b'IDAT' claims 4294902817 bytes"):
        decode_image(PNG_CHUNK_BOMB)
    photo = cv2.imread(str(data_dir / "images" / "maksssksksss0.jpg"))
    png = cv2.imencode(".png", photo)[1].tobytes()
    with pytest.raises(ImageDecodeError, match="claims"):
        decode_image(png[: len(png) // 2])  # truncated in the middle of a chunk
    assert np.array_equal(decode_image(png), photo[..., ::-1])  # a whole PNG decodes as before


def test_opencv_refusing_an_image_is_a_decode_error_not_a_crash():
    with pytest.raises(ImageDecodeError, match="OpenCV refused the image: .*CV_IO_MAX_IMAGE_WIDTH"):
        decode_image(BMP_TOO_WIDE, max_pixels=4_000_000)


def test_pixel_limit_refuses_before_decoding():
    ok, png = cv2.imencode(".png", np.zeros((300, 300, 3), np.uint8))
    with pytest.raises(PixelLimitError, match="90000 pixels"):
        decode_image(png.tobytes(), max_pixels=10_000)
    assert decode_image(png.tobytes(), max_pixels=90_000).shape == (300, 300, 3)


def test_read_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        read_image(bad)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        read_image(tmp_path / "absent.jpg")


def test_images_in_and_visible_files_skip_hidden_paths(tmp_path):
    """predict reads the photos of visible_files (is_photo, as images_in) and names the rest as skipped; hidden
    files and folders (.git, .DS_Store, editors' swap files) are neither read nor named."""
    for name in ("a.jpg", "sub/B.PNG", "sub/notes.txt", "anim.gif", ".hidden.jpg", ".cache/c.jpg", "sub/.swp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with a photo's name is not a photo
    assert [p.relative_to(tmp_path).as_posix() for p in visible_files(tmp_path)] == [
        "a.jpg", "anim.gif", "sub/B.PNG", "sub/notes.txt"]
    assert [p.relative_to(tmp_path).as_posix() for p in images_in(tmp_path)] == ["a.jpg", "sub/B.PNG"]
