"""Image processor parity with transformers' `Idefics2ImageProcessorPil` (REFERENCE §6)."""

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

import preprocessing_fixtures as fx  # noqa: E402
from idefics2_jax.processing.image_processing import Idefics2ImageProcessor, resize_output_size, split_boxes  # noqa: E402

STEP = 1 / 127.5  # one 8-bit step after normalisation to [-1, 1]


@pytest.fixture(scope="module")
def ref_split():
    return fx.reference_image_processor(do_image_splitting=True)


@pytest.fixture(scope="module")
def ref_nosplit():
    return fx.reference_image_processor(do_image_splitting=False)


@pytest.fixture(scope="module")
def ours():
    return Idefics2ImageProcessor.from_dict(fx.PREPROCESSOR_CONFIG)


def assert_matches(ref_out, our_out, exact=False):
    assert our_out["pixel_values"].dtype == np.float32
    assert our_out["pixel_values"].shape == ref_out["pixel_values"].shape
    np.testing.assert_array_equal(our_out["pixel_attention_mask"], ref_out["pixel_attention_mask"])
    assert our_out["pixel_attention_mask"].dtype == ref_out["pixel_attention_mask"].dtype
    diff = np.abs(our_out["pixel_values"] - ref_out["pixel_values"])
    assert diff.max() <= STEP + 1e-7 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    if exact:
        np.testing.assert_array_equal(our_out["pixel_values"], ref_out["pixel_values"])


def test_resize_rule_matches_reference():
    from transformers.image_utils import SizeDict
    from transformers.models.idefics2.image_processing_pil_idefics2 import get_resize_output_image_size

    size = {"shortest_edge": 378, "longest_edge": 980}
    ref_size = SizeDict(**size)
    sides = [1, 2, 3, 100, 377, 378, 379, 500, 653, 979, 980, 981, 1000, 1411, 1999, 2000, 3000, 4000, 7777]
    for h in sides:
        for w in sides:
            assert resize_output_size(h, w, size) == get_resize_output_image_size(np.empty((3, h, w)), ref_size)
    # REFERENCE §6 examples (height x width).
    assert resize_output_size(480, 640, size) == (480, 640)
    assert resize_output_size(240, 320, size) == (378, 378)
    assert resize_output_size(200, 1000, size) == (378, 980)
    assert resize_output_size(2000, 3000, size) == (653, 980)


def test_photographs_batch_bit_identical(ours, ref_split):
    # Rescale and normalise go through a table of the reference's own float64 -> float32 arithmetic, so the output
    # is not merely within one step: it is bit-identical.
    photos = [fx.photo(name) for name in fx.PHOTOS]
    assert_matches(ref_split([photos], return_tensors="np"), ours([photos]), exact=True)


def test_photographs_without_splitting(ours, ref_nosplit):
    photos = [fx.photo(name) for name in ("retina.jpg", "hubble_deep_field.jpg", "chelsea.png")]
    out = ours([photos], do_image_splitting=False)
    assert out["pixel_values"].shape[:2] == (1, 3)
    assert_matches(ref_nosplit([photos], return_tensors="np"), out)


@pytest.mark.parametrize("mode", list(fx.made_images()))
def test_modes(mode, ours, ref_split):
    # RGBA / LA / palette-with-transparency / RGB colour key: composited onto white; CMYK, L, 1, I;16: PIL convert.
    image = fx.made_images()[mode]
    assert_matches(ref_split([[image]], return_tensors="np"), ours([[image]]), exact=True)


def test_transparency_goes_onto_white(ours):
    clear = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    pixels = ours(clear, do_image_splitting=False)["pixel_values"]
    np.testing.assert_array_equal(pixels, 1.0)


@pytest.mark.parametrize("height,width", [(200, 250), (300, 500), (1200, 700), (700, 1500), (300, 4000), (2, 2),
                                          (3, 5)])
@pytest.mark.parametrize("split", [True, False])
def test_sizes(height, width, split, ours, ref_split, ref_nosplit):
    # Below / above 378 and 980 on either axis, the 4000 x 300 panorama, and the smallest images the reference splits.
    ref = ref_split if split else ref_nosplit
    image = Image.fromarray(fx.gradient_rgb(height, width, seed=height + width))
    assert_matches(ref([[image]], return_tensors="np"), ours([[image]], do_image_splitting=split), exact=True)


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_numpy_arrays(channels, ours, ref_split):
    rgb = fx.gradient_rgb(240, 330, seed=3)
    if channels == 4:
        array = np.concatenate([rgb, np.linspace(0, 255, 240 * 330).reshape(240, 330, 1).astype(np.uint8)], -1)
    elif channels == 3:
        array = rgb
    else:
        array = rgb[..., :1]
    ours_in = array[..., 0] if channels is None else array  # HW grayscale: the reference wants HW1 for the same
    assert_matches(ref_split([[array]], return_tensors="np"), ours([[ours_in]]), exact=True)


def test_batch_with_2_0_1_images(ours, ref_split):
    a, b, c = (fx.photo("chelsea.png"), Image.fromarray(fx.gradient_rgb(500, 420)), fx.photo("rocket.jpg"))
    batch = [[a, b], [], [c]]
    out = ours(batch)
    assert out["pixel_values"].shape[:2] == (3, 10)
    assert not out["pixel_attention_mask"][1].any() and not out["pixel_values"][1].any()
    assert not out["pixel_attention_mask"][2, 5:].any()
    assert_matches(ref_split(batch, return_tensors="np"), out, exact=True)


def test_input_structures(ours):
    image = Image.fromarray(fx.gradient_rgb(100, 120))
    single = ours(image)["pixel_values"]
    assert single.shape == (1, 5, 3, 378, 378)
    np.testing.assert_array_equal(ours([image])["pixel_values"], single)
    np.testing.assert_array_equal(ours([[image]])["pixel_values"], single)
    assert ours([image, image])["pixel_values"].shape[:2] == (1, 10)
    assert ours([[image], [image]])["pixel_values"].shape[:2] == (2, 5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1)])
def test_one_pixel_axes_are_not_halved(shape, ours, ref_nosplit):
    # The reference splits a 1-pixel axis into an empty half: 1 pixel high crashes it (ZeroDivisionError), 1 pixel
    # wide silently turns the left crops black. Here a 1-pixel axis is kept whole in both crops, so the image still
    # yields 5 crops (the text expansion assumes 5) and each crop is a resize of real pixels.
    image = Image.fromarray(fx.gradient_rgb(*shape, seed=5))
    reference = fx.reference_image_processor(do_image_splitting=True)
    if shape[0] == 1:
        with pytest.raises(ZeroDivisionError):
            reference([[image]], return_tensors="np")
    else:
        assert (reference([[image]], return_tensors="np")["pixel_values"][0, 0] == -1).all()
    out = ours(image)
    assert out["pixel_values"].shape == (1, 5, 3, 378, 378)
    assert out["pixel_attention_mask"].all()
    whole = ref_nosplit([[image]], return_tensors="np")["pixel_values"][0, 0]
    np.testing.assert_array_equal(out["pixel_values"][0, 4], whole)
    for crop, box in zip(out["pixel_values"][0], split_boxes(*shape)):
        left, top, right, bottom = box
        expected = ref_nosplit([[image.crop(box)]], return_tensors="np")["pixel_values"][0, 0]
        assert right > left and bottom > top
        np.testing.assert_array_equal(crop, expected)


def test_file_paths_and_exif(tmp_path, ours):
    from transformers.image_utils import load_image

    array = fx.gradient_rgb(200, 300, seed=7)
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    reference = fx.reference_image_processor(do_image_splitting=True)
    # The reference loads paths with EXIF orientation applied; so do we (and accept os.PathLike).
    expected = reference([[load_image(str(path))]], return_tensors="np")
    out = ours(path)
    assert out["pixel_values"].shape[-2:] == (378, 378) and expected["pixel_values"].shape == out["pixel_values"].shape
    assert_matches(expected, out, exact=True)
    np.testing.assert_array_equal(ours(str(path))["pixel_values"], out["pixel_values"])


def _bad_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = io.BytesIO()
    Image.fromarray(fx.gradient_rgb(300, 300)).save(good, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    jpeg = io.BytesIO()
    Image.fromarray(fx.gradient_rgb(300, 300)).save(jpeg, "JPEG")
    truncated_jpeg = tmp_path / "truncated.jpg"
    truncated_jpeg.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    return {"unreadable": text, "truncated png": truncated, "truncated jpeg": truncated_jpeg,
            "missing": tmp_path / "missing.png"}


def test_bad_files(tmp_path, ours):
    for what, path in _bad_files(tmp_path).items():
        with pytest.raises(ValueError, match="Cannot read image|not found"):
            ours(str(path))
    lazily_opened = Image.open(_bad_files(tmp_path)["truncated png"])
    with pytest.raises(ValueError, match="Cannot decode"):
        ours(lazily_opened)
    with pytest.raises(ValueError, match="URL"):
        ours("https://example.com/cat.png")


@pytest.mark.parametrize("array,match", [
    (np.zeros((0, 10, 3), np.uint8), "zero size"),
    (np.zeros((10, 0), np.uint8), "zero size"),
    (np.zeros((4, 10, 10, 3), np.uint8), "rank 4"),
    (np.zeros((10,), np.uint8), "rank 1"),
    (np.zeros((3, 40, 50), np.uint8), "channels-first"),
    (np.zeros((10, 10, 2), np.uint8), "1, 3 or 4 channels"),
    (np.zeros((10, 10, 3), np.float32), "uint8"),
])
def test_bad_arrays(array, match, ours):
    with pytest.raises(ValueError, match=match):
        ours(array)


def test_bad_structures(ours):
    for bad in ([], [[]], [[], []], 3, [1, 2], [[Image.new("RGB", (5, 5))], [None]]):
        with pytest.raises(ValueError):
            ours(bad)
    with pytest.raises(ValueError, match="zero size"):
        ours(Image.new("RGB", (0, 5)))


def test_from_pretrained_and_save(tmp_path):
    fx.write_reference_dir(str(tmp_path / "hf"))
    ip = Idefics2ImageProcessor.from_pretrained(tmp_path / "hf")
    assert ip.do_image_splitting is True and ip.size == {"longest_edge": 980, "shortest_edge": 378}
    assert ip.num_crops() == 5 and ip.num_crops(False) == 1
    ip.save_pretrained(tmp_path / "copy")
    again = Idefics2ImageProcessor.from_pretrained(tmp_path / "copy")
    assert again.to_dict() == ip.to_dict()
    # transformers reads the saved file back to the same settings.
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    hf = Idefics2ImageProcessorPil.from_pretrained(str(tmp_path / "copy"))
    assert hf.do_image_splitting is True and hf.size.longest_edge == 980 and hf.size.shortest_edge == 378
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        Idefics2ImageProcessor.from_pretrained(tmp_path)


def test_single_thread_matches_threads(ours):
    photos = [fx.photo("coffee.png"), fx.photo("astronaut.png")]
    single = Idefics2ImageProcessor.from_dict(fx.PREPROCESSOR_CONFIG, num_threads=1)
    np.testing.assert_array_equal(single(photos)["pixel_values"], ours(photos)["pixel_values"])
