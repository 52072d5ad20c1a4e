"""Training data: TRL's vision SFT format -> model batches with labels on what the assistant must generate.

An example is `{"messages": [chat messages as for apply_chat_template], "images": [PIL images or paths]}`, the
images in the order of the `{"type": "image"}` blocks. A token is labelled iff the model must generate it after an
assistant turn's generation prompt: that turn's text and its `<end_of_utterance>`. Everything else (BOS, user turns,
role prefixes, the "\\n" after `<end_of_utterance>`, image and fake-image tokens, padding) is IGNORE_INDEX (-100).

The labels are found on the rendered text, not by searching for token patterns: for each assistant turn the
conversation up to it is rendered with the generation prompt (what `generate` is given at inference), that string must
be a prefix of the whole rendering, and the labelled span runs from its end to the end of the turn's first
`<end_of_utterance>`. Tokens are mapped to the span by their character offsets.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..nn.model import IGNORE_INDEX
from ..processing.image_processing import load_image_file

END_OF_UTTERANCE = "<end_of_utterance>"
ROLES = ("system", "user", "assistant")


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where}: content must be a string or a non-empty list of blocks.")
    for block in content:
        if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
            raise ValueError(f"{where}: every content block must be a dict with type 'text' or 'image', got {block!r}.")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise ValueError(f"{where}: a text block needs a string 'text'.")
    return content


def normalize(example: Any, where: str = "example") -> dict:
    """Check one TRL-format example and return {"messages": [...], "images": [...]} (string contents as text
    blocks; images taken from "images", else from the image blocks' "image"/"path" keys)."""
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list) or not example["messages"]:
        raise ValueError(f"{where}: expected {{'messages': [...], 'images': [...]}} with a non-empty message list.")
    messages = []
    for j, message in enumerate(example["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where}: message {j} needs a role in {ROLES}, got {message!r:.80}.")
        messages.append({"role": message["role"], "content": _blocks(message.get("content"),
                                                                       f"{where}, message {j}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant turn, so nothing to learn from.")
    image_blocks = [b for m in messages for b in m["content"] if b["type"] == "image"]
    images = example.get("images")
    if images is None:
        images = [b.get("image", b.get("path")) for b in image_blocks]
        if any(im is None for im in images):
            raise ValueError(f"{where}: image blocks without images (give an 'images' list).")
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"{where}: 'images' must be a list.")
    if len(images) != len(image_blocks):
        raise ValueError(f"{where}: {len(image_blocks)} image blocks in the messages but {len(images)} images.")
    out = {"messages": messages, "images": list(images)}
    if "_where" in example:
        out["_where"] = example["_where"]
    return out


def _expanded(processor, messages, add_generation_prompt: bool, split: bool) -> str:
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return processor.expand_image_tokens(text, split)


def encode(processor, example: dict, do_image_splitting: bool | None = None, where: str = "example"):
    """One normalized example -> (input_ids, labels) lists, BOS included."""
    split = processor.image_processor.do_image_splitting if do_image_splitting is None else bool(do_image_splitting)
    messages = example["messages"]
    text = _expanded(processor, messages, False, split)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _expanded(processor, messages[:i], True, split) if i else ""
        if not text.startswith(prompt):
            raise ValueError(f"{where}: the chat template does not render the generation prompt of turn {i} as a "
                             "prefix of the conversation, so the assistant text cannot be located.")
        end = text.find(END_OF_UTTERANCE, len(prompt))
        if end < 0:
            raise ValueError(f"{where}: the chat template puts no {END_OF_UTTERANCE} after assistant turn {i}.")
        spans.append((len(prompt), end + len(END_OF_UTTERANCE)))
    tok = processor.tokenizer
    ids, offsets = tok.encode_with_offsets(text, add_special_tokens=not text.startswith(tok.bos_token or "\0"))
    never = {tok.convert_tokens_to_ids(t) for t in (processor.image_token, processor.fake_image_token)}
    never |= {i for i in (tok.bos_token_id, tok.pad_token_id) if i is not None}
    labels = [IGNORE_INDEX] * len(ids)
    for k, (token_id, (start, stop)) in enumerate(zip(ids, offsets)):
        if token_id not in never and stop > start and any(a <= start and stop <= b for a, b in spans):
            labels[k] = token_id
    return ids, labels


def _encode_checked(processor, example: dict, split, max_length: int | None, where: str):
    """`encode`, and the checks every training sample must pass: at most max_length tokens, something labelled."""
    ids, labels = encode(processor, example, split, where)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"{where} has {len(ids)} tokens, more than max_length={max_length} (samples are not "
                         "truncated: shorten it, drop it or raise max_length).")
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"{where}: no token is labelled (empty assistant turns?).")
    return ids, labels


def collate(processor, examples: Sequence[dict], max_length: int | None = None, *,
            do_image_splitting: bool | None = None, pad_to_multiple_of: int | None = None) -> dict:
    """TRL-format examples -> the processor's numpy arrays plus `labels` (right-padded, as for training: every
    sample's positions start at 0, as in the reference's forward).

    max_length: a sample with more tokens is a ValueError naming it (samples are never cut, so never cut through
    an image). pad_to_multiple_of: pad the length up to a multiple (fewer distinct shapes, fewer compilations).
    """
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError("collate needs a non-empty list of examples.")
    examples = [normalize(e, e.get("_where", f"sample {i}") if isinstance(e, dict) else f"sample {i}")
                for i, e in enumerate(examples)]
    split = processor.image_processor.do_image_splitting if do_image_splitting is None else bool(do_image_splitting)
    rows = [_encode_checked(processor, e, split, max_length, e.get("_where", f"sample {i}"))
            for i, e in enumerate(examples)]
    length = max(len(ids) for ids, _ in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        raise ValueError("The tokenizer has no pad token, so a batch cannot be padded.")
    input_ids = np.full((len(rows), length), pad, np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, np.int64)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, :len(ids)], attention_mask[r, :len(ids)], labels[r, :len(ids)] = ids, 1, lab
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    images = [[load_image_file(im) if isinstance(im, (str, os.PathLike)) else processor._load(im)
               for im in e["images"]] for e in examples]
    if any(images):
        batch.update(processor.image_processor(images, do_image_splitting=split, return_tensors="np"))
    return batch


def read_jsonl(path: str | os.PathLike, processor=None, max_length: int | None = None) -> list[dict]:
    """Read and check a JSONL file of TRL-format examples (one per line; image paths relative to the file).

    Every problem (a line that is not JSON, no assistant turn, image/marker mismatch, a missing or unreadable image,
    a sample over max_length) is a ValueError naming the line, raised before any training starts. With a
    processor, each example is also encoded once and checked as `collate` checks it (length, something labelled).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Data file not found: {path!r}")
    base = os.path.dirname(os.path.abspath(path))
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno}).") from None
            example = normalize(raw, where)
            images = []
            for im in example["images"]:
                if not isinstance(im, str):
                    raise ValueError(f"{where}: images in a JSONL file must be paths, got {im!r:.60}.")
                full = im if os.path.isabs(im) else os.path.join(base, im)
                try:
                    with Image.open(full) as probe:
                        probe.verify()
                except (OSError, SyntaxError) as e:
                    raise ValueError(f"{where}: cannot read image {im!r} ({e}).") from None
                images.append(full)
            example = {**example, "images": images, "_where": where}
            if processor is not None:
                _encode_checked(processor, example, None, max_length, where)
            examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    return examples
