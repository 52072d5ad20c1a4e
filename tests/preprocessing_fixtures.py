"""Shared helpers for the preprocessing parity tests: an Idefics2-style processor directory built from the Mistral-7B
SentencePiece model that ships in `mistral-common`, the transformers reference built from it, and test images.

Nothing is downloaded: the tokenizer model is package data of mistral-common and the photographs are the sample
images in scikit-image's wheel (skimage/data).
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
from PIL import Image

IMAGE_SEQ_LEN = 64

# The hub's preprocessor_config.json for HuggingFaceM4/idefics2-8b.
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Idefics2ImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "processor_class": "Idefics2Processor", "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 980, "shortest_edge": 378},
}

_ADDED = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<fake_token_around_image>", 32001: "<image>",
          32002: "<end_of_utterance>"}

# A LlamaTokenizer folder as REFERENCE §7 describes it (add_bos_token, non-legacy, the three added tokens).
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
    "added_tokens_decoder": {
        str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, c in _ADDED.items()
    },
}

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
          "retina.jpg", "rocket.jpg"]


def sentencepiece_model_path() -> str:
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mistral-common no longer ships {path}")
    return path


def write_reference_dir(directory: str, chat_template: str | None = None) -> str:
    """An HF-layout processor directory: tokenizer.model + tokenizer_config.json + preprocessor/processor configs."""
    from idefics2_jax.processing import DEFAULT_CHAT_TEMPLATE

    os.makedirs(directory, exist_ok=True)
    shutil.copyfile(sentencepiece_model_path(), os.path.join(directory, "tokenizer.model"))
    files = {
        "tokenizer_config.json": TOKENIZER_CONFIG,
        "preprocessor_config.json": PREPROCESSOR_CONFIG,
        "processor_config.json": {"image_seq_len": IMAGE_SEQ_LEN, "processor_class": "Idefics2Processor",
                                  "chat_template": chat_template or DEFAULT_CHAT_TEMPLATE},
    }
    for name, content in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return directory


def reference_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def reference_image_processor(**overrides):
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    config = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k not in ("image_processor_type", "processor_class")}
    return Idefics2ImageProcessorPil(**{**config, **overrides})


def reference_processor(directory: str, **image_overrides):
    """transformers' Idefics2Processor from the directory's tokenizer and `Idefics2ImageProcessorPil`."""
    from transformers import Idefics2Processor

    with open(os.path.join(directory, "processor_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return Idefics2Processor(image_processor=reference_image_processor(**image_overrides),
                             tokenizer=reference_tokenizer(directory), image_seq_len=config["image_seq_len"],
                             chat_template=config.get("chat_template"))


# ------------------------------------------------------------------------------------------------------ images
def photo(name: str) -> Image.Image:
    import skimage

    image = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name))
    image.load()
    return image


def gradient_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth content plus noise, so resizing has something to interpolate."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x + y) * 127 / max(height + width - 2, 1)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def made_images() -> dict[str, Image.Image]:
    """One image per PIL mode / transparency case the reference treats differently."""
    rgb = gradient_rgb(300, 400, seed=1)
    alpha = np.tile(np.linspace(0, 255, 400).astype(np.uint8), (300, 1))
    rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1), "RGBA")
    gray = Image.fromarray(rgb[..., 0], "L")
    palette = Image.fromarray(rgb).quantize(64)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    colour_key = Image.fromarray(rgb)
    colour_key.info["transparency"] = tuple(int(v) for v in rgb[0, 0])
    png16 = io.BytesIO()
    Image.fromarray((gradient_rgb(250, 330, seed=2)[..., 0].astype(np.uint16) * 257)).save(png16, "PNG")
    return {
        "RGB": Image.fromarray(rgb),
        "L": gray,
        "LA": Image.merge("LA", [gray, Image.fromarray(alpha)]),
        "RGBA": rgba,
        "P": palette,
        "P+transparency": palette_transparent,
        "RGB+colour-key": colour_key,
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "I;16 png": Image.open(io.BytesIO(png16.getvalue())),
        "1-bit": Image.fromarray(rgb[..., 1] > 128),
    }
