"""Idefics2 image processor in numpy + Pillow, matching transformers' `Idefics2ImageProcessorPil` (5.x).

Order (REFERENCE §6): convert to RGB -> split (4 crops + original) -> resize -> rescale -> normalize -> pad.

Where this differs from the reference, on purpose:
- A 1-pixel-wide (or -high) image crashes the reference when splitting (empty crops, ZeroDivisionError). Here an axis
  of length 1 is not halved: both crops along it take the whole axis, so a 1x1 image gives five copies of itself and
  the number of crops (hence of `<image>` tokens) never depends on the image size.
- File paths are opened here, EXIF-transposed and then converted like PIL images (transparency onto white); the
  reference's loader calls `convert("RGB")`, which drops the alpha channel instead.
- Only uint8 arrays are accepted (HWC with 1, 3 or 4 channels, or HW grayscale); anything else is a ValueError rather
  than a guess about its range or channel layout.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import read_json

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
DEFAULT_SIZE = {"shortest_edge": 378, "longest_edge": 980}
NUM_SPLIT_CROPS = 5  # four quarters + the original image


def _size_dict(size) -> dict:
    if size is None:
        return dict(DEFAULT_SIZE)
    if isinstance(size, int):
        return {"height": size, "width": size}
    size = {k: v for k, v in dict(size).items() if v is not None}
    if {"shortest_edge", "longest_edge"} <= size.keys() or {"height", "width"} <= size.keys():
        return size
    raise ValueError(f"size must have 'shortest_edge' and 'longest_edge', or 'height' and 'width'; got {size}.")


def resize_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """The reference's resize rule: cap the longer side at `longest_edge`, then floor each side at `shortest_edge`.

    The float expressions are the reference's own (`int(w / (w / h))`, not `h * 980 // w`): the two round differently.
    """
    if "height" in size and "width" in size and not ("shortest_edge" in size and "longest_edge" in size):
        return int(size["height"]), int(size["width"])
    min_len, max_len = size["shortest_edge"], size["longest_edge"]
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, min_len), max(width, min_len)


def split_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """PIL boxes (left, top, right, bottom) of the four quarter crops and the whole image, in the reference's order.

    An axis of length 1 is not halved (see the module docstring): its "first half" and "second half" both span it.
    """
    mh, mw = height // 2, width // 2
    rows = [(0, mh if mh else height), (mh, height)]
    cols = [(0, mw if mw else width), (mw, width)]
    boxes = [(x0, y0, x1, y1) for y0, y1 in rows for x0, x1 in cols]
    return boxes + [(0, 0, width, height)]


def load_image_file(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later) and apply its EXIF orientation."""
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"Image URLs are not fetched (no network access at run time); download it first: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"Image file not found: {path!r}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"Cannot read image file {path!r}: {e}") from e


def load_pil(image: Image.Image, exif_transpose: bool = False) -> Image.Image:
    """Decode a (possibly lazily opened) PIL image now, so a truncated file is a ValueError here."""
    try:
        image.load()
        return ImageOps.exif_transpose(image) if exif_transpose else image
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot decode image: {e}") from e


def to_rgb(image: Any) -> Image.Image:
    """Convert one input image (PIL image, uint8 array or file path) to an RGB PIL image, as the reference does."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image_file(image)
    if isinstance(image, Image.Image):
        image = load_pil(image)
        if image.width == 0 or image.height == 0:
            raise ValueError(f"Image has zero size ({image.width}x{image.height}).")
        # The reference's test for transparency: an alpha band, or a `transparency` entry (palette / colour key).
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image))
    raise ValueError(
        f"Unsupported image type {type(image).__name__}: expected a PIL image, an HWC uint8 numpy array or a file path."
    )


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(
            f"Image arrays must be HW or HWC, got shape {array.shape} (rank {array.ndim}); "
            "pass a stack of images as a list."
        )
    if array.shape[0] == 0 or array.shape[1] == 0 or array.size == 0:
        raise ValueError(f"Image array has zero size: shape {array.shape}.")
    channels = array.shape[-1]
    if channels not in (1, 3, 4):
        hint = " (it looks channels-first; transpose to HWC)" if array.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"Image arrays must have 1, 3 or 4 channels last, got shape {array.shape}{hint}.")
    if array.dtype != np.uint8:
        raise ValueError(f"Image arrays must be uint8 (0-255), got {array.dtype}; convert with e.g. .astype(np.uint8).")
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        # The reference composites arrays in float64 and rounds (PIL images go through PIL's integer compositor).
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _is_image(x) -> bool:
    return isinstance(x, (Image.Image, np.ndarray, str, os.PathLike))


def make_nested_images(images) -> list[list[Any]]:
    """Normalise a single image, a flat list (one sample) or a list of lists (a batch) to a list of lists."""
    if _is_image(images):
        return [[images]]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("No images given.")
        if all(isinstance(x, (list, tuple)) for x in images):
            for i, sample in enumerate(images):
                for x in sample:
                    if not _is_image(x):
                        raise ValueError(f"Sample {i} holds a {type(x).__name__}, not an image.")
            return [list(sample) for sample in images]
        if all(_is_image(x) for x in images):
            return [list(images)]
    raise ValueError("Images must be a single image, a list of images, or a list of lists of images.")



class Idefics2ImageProcessor:
    """Turns images into `pixel_values` (B, N, 3, H, W) float32 and `pixel_attention_mask` (B, N, H, W) int64.

    Attributes and defaults mirror transformers' class; `from_pretrained` reads a checkpoint's
    `preprocessor_config.json` (the hub file sets `do_image_splitting: true`).
    """

    model_input_names = ["pixel_values", "pixel_attention_mask"]

    def __init__(
        self,
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        size: dict | None = None,
        resample: int = Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | float = (0.5, 0.5, 0.5),
        image_std: Sequence[float] | float = (0.5, 0.5, 0.5),
        do_pad: bool = True,
        do_image_splitting: bool = False,
        num_threads: int | None = None,
        **unused: Any,
    ):
        if not do_convert_rgb:
            # The model takes 3 channels; a 1- or 4-channel tensor would only fail later, inside the vision tower.
            raise ValueError("do_convert_rgb=False is not supported: images are always converted to RGB.")
        self.do_convert_rgb = True
        self.do_resize = bool(do_resize)
        self.size = _size_dict(size)
        self.resample = int(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(image_mean)] * 3 if np.isscalar(image_mean) else [float(v) for v in image_mean]
        self.image_std = [float(image_std)] * 3 if np.isscalar(image_std) else [float(v) for v in image_std]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values (RGB).")
        self.do_pad = bool(do_pad)
        self.do_image_splitting = bool(do_image_splitting)
        # PIL releases the GIL while cropping and resizing, so crops of different images can run side by side.
        self.num_threads = num_threads if num_threads is not None else min(4, os.cpu_count() or 1)
        self._lut = self._build_lut()

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, config: dict, **overrides) -> "Idefics2ImageProcessor":
        return cls(**{**config, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Idefics2ImageProcessor":
        """The settings as transformers 5.x resolves them: nested under "image_processor" in processor_config.json
        (what `save_pretrained` writes since transformers 5.24), else preprocessor_config.json (the hub's layout)."""
        path = os.fspath(path)
        nested = read_json(os.path.join(path, PROCESSOR_CONFIG)).get("image_processor")
        if isinstance(nested, dict):
            return cls.from_dict(nested, **overrides)
        file = os.path.join(path, PREPROCESSOR_CONFIG)
        if not os.path.isfile(file):
            raise ValueError(f"No {PREPROCESSOR_CONFIG} in {path!r}, and no \"image_processor\" settings in its "
                             f"{PROCESSOR_CONFIG}.")
        return cls.from_dict(read_json(file), **overrides)

    def to_dict(self) -> dict:
        return {
            "image_processor_type": "Idefics2ImageProcessor",
            "processor_class": "Idefics2Processor",
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_pad": self.do_pad,
            "do_image_splitting": self.do_image_splitting,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(os.fspath(directory), PREPROCESSOR_CONFIG)
        with open(file, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return file

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    # --------------------------------------------------------------------------------------------------- helpers
    def _build_lut(self) -> np.ndarray:
        """(3, 256) float32: every uint8 value through rescale and normalize with the reference's exact arithmetic.

        The reference rescales in float64 and casts to float32, then normalizes in float32; a table of the 256
        possible results makes the output bit-identical to it and replaces per-pixel float math with one gather.
        """
        values = np.arange(256, dtype=np.float64)
        if self.do_rescale:
            values = values * self.rescale_factor
        values = np.broadcast_to(values.astype(np.float32), (3, 256))
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            values = (values - mean) / std
        return np.ascontiguousarray(values, dtype=np.float32)

    def num_crops(self, do_image_splitting: bool | None = None) -> int:
        """How many images each input image becomes (5 with splitting): the processor expands `<image>` with this."""
        split = self.do_image_splitting if do_image_splitting is None else do_image_splitting
        return NUM_SPLIT_CROPS if split else 1

    def _plan(self, image: Image.Image, split: bool) -> list[tuple[tuple[int, int, int, int], tuple[int, int]]]:
        """(crop box, output (h, w)) for each crop of one RGB image."""
        w, h = image.size
        boxes = split_boxes(h, w) if split else [(0, 0, w, h)]
        plan = []
        for box in boxes:
            ch, cw = box[3] - box[1], box[2] - box[0]
            plan.append((box, resize_output_size(ch, cw, self.size) if self.do_resize else (ch, cw)))
        return plan

    def _render(self, image: Image.Image, box, out_hw, out_pixels: np.ndarray) -> None:
        """Crop, resize (PIL, like the reference: same source pixels, same call) and normalise into `out_pixels`."""
        crop = image if box == (0, 0, image.width, image.height) else image.crop(box)
        h, w = out_hw
        if crop.size != (w, h):
            crop = crop.resize((w, h), resample=self.resample, reducing_gap=None)
        array = np.asarray(crop)
        for c in range(3):
            np.take(self._lut[c], array[:, :, c], out=out_pixels[c, :h, :w], mode="clip")

    # ------------------------------------------------------------------------------------------------- __call__
    def __call__(
        self,
        images,
        do_image_splitting: bool | None = None,
        return_tensors: str | None = "np",
        **kwargs: Any,
    ) -> dict:
        """Preprocess a batch.

        Args:
          images: one image, a list of images (one sample), or a list of lists of images (a batch; a sample may be
            empty). An image is a PIL image, an (H, W[, C]) uint8 array with C in {1, 3, 4}, or a file path.
          do_image_splitting: overrides the attribute for this call.
          return_tensors: "np" (or None) for numpy arrays, "jax" for jax arrays.

        Returns:
          {"pixel_values": float32 [B, N, 3, H, W], "pixel_attention_mask": int64 [B, N, H, W]} where N is the
          largest image count in the batch times the crops per image, H and W the largest sizes; padding is 0.
        """
        if kwargs:
            raise ValueError(f"Unexpected arguments: {sorted(kwargs)}.")
        split = self.do_image_splitting if do_image_splitting is None else bool(do_image_splitting)
        batch = make_nested_images(images)
        rgb = [[to_rgb(image) for image in sample] for sample in batch]
        if not any(rgb):
            raise ValueError("No images given (every sample is empty).")

        plans = [[self._plan(image, split) for image in sample] for sample in rgb]
        sizes = [hw for sample in plans for plan in sample for _, hw in plan]
        n_max = max(sum(len(plan) for plan in sample) for sample in plans)

        if not self.do_pad:
            return self._unpadded(rgb, plans, return_tensors)

        max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
        pixel_values = np.zeros((len(rgb), n_max, 3, max_h, max_w), dtype=np.float32)
        pixel_mask = np.zeros((len(rgb), n_max, max_h, max_w), dtype=np.int64)
        jobs = []
        for b, (sample, sample_plans) in enumerate(zip(rgb, plans)):
            n = 0
            for image, plan in zip(sample, sample_plans):
                for box, (h, w) in plan:
                    pixel_mask[b, n, :h, :w] = 1
                    jobs.append((image, box, (h, w), pixel_values[b, n]))
                    n += 1
        self._run(jobs)
        return _as_tensors({"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}, return_tensors)

    preprocess = __call__

    def _run(self, jobs: list) -> None:
        if self.num_threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=min(self.num_threads, len(jobs))) as pool:
                for future in [pool.submit(self._render, *job) for job in jobs]:
                    future.result()
        else:
            for job in jobs:
                self._render(*job)

    def _unpadded(self, rgb, plans, return_tensors) -> dict:
        out = []
        for sample, sample_plans in zip(rgb, plans):
            arrays, jobs = [], []
            for image, plan in zip(sample, sample_plans):
                for box, (h, w) in plan:
                    arrays.append(np.zeros((3, h, w), dtype=np.float32))
                    jobs.append((image, box, (h, w), arrays[-1]))
            self._run(jobs)
            out.append(arrays)
        if return_tensors not in (None, "np"):
            raise ValueError("do_pad=False returns lists of arrays; use return_tensors='np' or None.")
        return {"pixel_values": out}


def _as_tensors(data: dict, return_tensors: str | None) -> dict:
    if return_tensors in (None, "np"):
        return data
    if return_tensors == "jax":
        import jax.numpy as jnp

        # int64 would be truncated (with a warning) when jax runs without x64.
        return {k: jnp.asarray(v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in data.items()}
    raise ValueError(f"return_tensors must be 'np', 'jax' or None, got {return_tensors!r}.")
