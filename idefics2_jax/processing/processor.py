"""Idefics2 processor: chat messages and photos -> `input_ids`, `attention_mask`, `pixel_values`,
`pixel_attention_mask`, laid out as transformers 5.x's `Idefics2Processor` lays them out.

Differences from the reference, on purpose:
- Whether images are split is decided once per call (`do_image_splitting` argument, else the image processor's
  attribute) and used both for the `<image>` expansion and for the pixels; the reference expands from the attribute
  only, so a call-time `do_image_splitting=False` makes text and pixels disagree.
- Image counts are checked per prompt (and `<image>` markers without any images are an error), not only in total.
- Transparent images are composited onto white as the image processor intends; the reference's processor first runs
  `convert("RGB")` on PIL images, which drops alpha. EXIF orientation is applied like the reference.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .files import read_json
from .image_processing import PROCESSOR_CONFIG, Idefics2ImageProcessor, _as_tensors, _is_image, load_pil
from .tokenizer import Idefics2Tokenizer

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"

# The template published with idefics2-8b (hub processor_config.json; also transformers 4.40's default).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _plain(value: Any) -> Any:
    """What a (sandboxed, untrusted) chat template may see: JSON-like data, anything else as a '<TypeName>' string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    # Subclasses (enums, ...) may carry methods the sandbox does not know about: strip them to the base type.
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(template: str):
    """Jinja environment as transformers builds it: sandboxed, trim_blocks + lstrip_blocks, loop controls."""
    if template not in _TEMPLATE_CACHE:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATE_CACHE[template] = env.from_string(template)
    return _TEMPLATE_CACHE[template]


class Idefics2Processor:
    """Pairs `Idefics2ImageProcessor` and `Idefics2Tokenizer` the way transformers' `Idefics2Processor` does."""

    def __init__(self, image_processor: Idefics2ImageProcessor, tokenizer: Idefics2Tokenizer,
                 image_seq_len: int = 64, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_len = int(image_seq_len)
        self.chat_template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        # As the reference: the image tokens and <end_of_utterance> are added as special tokens when missing.
        tokenizer.add_special_tokens([FAKE_IMAGE_TOKEN, IMAGE_TOKEN])
        tokenizer.add_special_tokens([END_OF_UTTERANCE_TOKEN])
        self.fake_image_token = FAKE_IMAGE_TOKEN
        self.image_token = IMAGE_TOKEN
        self.end_of_utterance_token = END_OF_UTTERANCE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.fake_image_token_id = tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)
        self.end_of_utterance_token_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE_TOKEN)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **image_processor_overrides) -> "Idefics2Processor":
        """Load from an HF Idefics2 directory (or a converted one written by `save_pretrained`)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"Processor directory not found: {path!r}")
        tokenizer = Idefics2Tokenizer.from_pretrained(path)
        image_processor = Idefics2ImageProcessor.from_pretrained(path, **image_processor_overrides)
        config = read_json(os.path.join(path, PROCESSOR_CONFIG))
        return cls(image_processor, tokenizer, image_seq_len=config.get("image_seq_len", 64),
                   chat_template=cls._find_chat_template(path, config))

    @staticmethod
    def _find_chat_template(path: str, config: dict) -> str | None:
        # Where transformers looks, in its order; the tokenizer's template is the last resort before the default.
        if config.get("chat_template"):
            return config["chat_template"]
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return f.read()
        template = read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        if template:
            return template
        template = read_json(os.path.join(path, "tokenizer_config.json")).get("chat_template")
        return template if isinstance(template, str) and template else None

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write tokenizer files, preprocessor_config.json and processor_config.json (with the chat template)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        written = self.tokenizer.save_pretrained(directory)
        written.append(self.image_processor.save_pretrained(directory))
        config_file = os.path.join(directory, PROCESSOR_CONFIG)
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump({"processor_class": "Idefics2Processor", "image_seq_len": self.image_seq_len,
                       "chat_template": self.chat_template}, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return written + [config_file]

    # ------------------------------------------------------------------------------------------------- text
    def expand_image_tokens(self, prompt: str, do_image_splitting: bool | None = None) -> str:
        """Each `<image>` -> fake + `<image>` x image_seq_len + fake, per crop; adjacent fakes merged; then the
        5.x rule: a space after a fake token directly followed by a character that is neither whitespace nor '<'."""
        fake = self.fake_image_token
        image_str = f"{fake}{self.image_token * self.image_seq_len}{fake}"
        image_str *= self.image_processor.num_crops(do_image_splitting)
        prompt = prompt.replace(self.image_token, image_str)
        prompt = prompt.replace(f"{fake}{fake}", fake)  # one non-overlapping pass, as the reference
        return re.sub(rf"{re.escape(fake)}(?=[^\s<])", f"{fake} ", prompt)

    # ------------------------------------------------------------------------------------------------ __call__
    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        do_image_splitting: bool | None = None,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> dict:
        """Tokenize prompts (with `<image>` markers) and preprocess their images.

        Args:
          images: a single image, a flat list (distributed over the prompts in order of their `<image>` markers), or
            one list per prompt. Images are PIL images, HWC uint8 arrays or file paths.
          text: one prompt or a list of prompts.
          padding: True/"longest" to pad the batch (left, as the tokenizer).
          return_tensors: None (lists for text), "np" or "jax".
          do_image_splitting: overrides the image processor's setting for both the text and the pixels.

        Returns: a dict with `input_ids`, `attention_mask` (when text is given) and `pixel_values`,
          `pixel_attention_mask` (when images are given).
        """
        if kwargs:
            raise ValueError(f"Unexpected arguments: {sorted(kwargs)}.")
        if text is None and images is None:
            raise ValueError("Provide text, images or both.")
        split = self.image_processor.do_image_splitting if do_image_splitting is None else bool(do_image_splitting)
        out: dict[str, Any] = {}
        counts = None
        if text is not None:
            prompts = [text] if isinstance(text, str) else text
            if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("text must be a string or a non-empty list of strings.")
            counts = [p.count(self.image_token) for p in prompts]
        batch = self._group_images(images, counts)  # checks image counts before any work is done
        if text is not None:
            expanded = [self.expand_image_tokens(p, split) for p in prompts]
            out.update(self.tokenizer(expanded, padding=padding, add_special_tokens=add_special_tokens,
                                      return_tensors=return_tensors, padding_side=padding_side))
        if batch is not None and any(batch):
            batch = [[self._load(image) for image in sample] for sample in batch]
            pixels = self.image_processor(batch, do_image_splitting=split, return_tensors="np")
            out.update(_as_tensors(pixels, return_tensors))
        return out

    @staticmethod
    def _load(image):
        # The reference's loader applies EXIF orientation to PIL images (paths get it in the image processor).
        return load_pil(image, exif_transpose=True) if isinstance(image, Image.Image) else image

    def _group_images(self, images, counts: list[int] | None) -> list[list[Any]] | None:
        """Images as one list per prompt, checked against each prompt's `<image>` count."""
        if images is None:
            if counts and any(counts):
                raise ValueError(f"The prompts have {counts} {self.image_token} markers but no images were given.")
            return None
        if _is_image(images):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be an image, a list of images or a list of lists, not {type(images)}.")
        nested = len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images)
        if not nested:
            if not all(_is_image(x) for x in images):
                raise ValueError("images must be an image, a list of images or a list of lists of images.")
            if counts is None:
                return [list(images)]
            if sum(counts) != len(images):
                raise ValueError(f"The prompts have {sum(counts)} {self.image_token} markers in total ({counts} per "
                                 f"prompt) but {len(images)} images were given.")
            starts = np.cumsum([0] + counts)
            return [list(images[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        batch = [list(sample) for sample in images]
        if counts is not None:
            if len(batch) != len(counts):
                raise ValueError(f"{len(counts)} prompts but {len(batch)} lists of images.")
            for i, (n_text, sample) in enumerate(zip(counts, batch)):
                if n_text != len(sample):
                    raise ValueError(f"Prompt {i} has {n_text} {self.image_token} markers but {len(sample)} images.")
        return batch

    # ------------------------------------------------------------------------------------------ chat template
    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        tokenize: bool = False,
        return_tensors: str | None = None,
        **kwargs: Any,
    ):
        """Render messages with the checkpoint's chat template (Jinja, as transformers renders it).

        A conversation is a list of {"role", "content": [{"type": "text", "text": ...} | {"type": "image", ...}]}.
        Returns the prompt string (a list for a batch of conversations). With `tokenize=True` the prompt is run
        through `__call__` with the images found in the content blocks ("image" or "path" keys) and the dict of
        arrays is returned.
        """
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(
            conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        template = _compile_template(chat_template or self.chat_template)
        tok = self.tokenizer
        special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
                   "pad_token": tok.pad_token, "additional_special_tokens": list(tok.additional_special_tokens)}
        template_kwargs = _plain({**{k: v for k, v in special.items() if v is not None}, **kwargs})
        prompts = []
        for chat in conversations:
            # Keys set to None are dropped, as transformers does (templates test for presence, not for None).
            messages = [{k: v for k, v in m.items() if v is not None} for m in chat]
            prompts.append(template.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                                           tools=None, documents=None, **template_kwargs))
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [[block.get("image", block.get("path")) for m in chat for block in m.get("content", [])
                   if isinstance(block, dict) and block.get("type") == "image"] for chat in conversations]
        if any(im is None for sample in images for im in sample):
            raise ValueError("tokenize=True needs every image block to carry an 'image' (PIL/array) or a 'path'.")
        add_special = not (tok.bos_token is not None and prompts[0].startswith(tok.bos_token))
        return self(text=prompts, images=images if any(images) else None, return_tensors=return_tensors,
                    add_special_tokens=add_special, padding=len(prompts) > 1)

    # ------------------------------------------------------------------------------------------------ decoding
    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"]
