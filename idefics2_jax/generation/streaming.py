"""Streaming decoded text as tokens arrive."""

from __future__ import annotations

import functools
import sys

import numpy as np

# ------------------------------------------------------------------------------------------------- streaming
class TextStreamer:
    """Prints text as tokens arrive (transformers' `TextStreamer` protocol: `put(ids)`, `end()`; batch 1 only).

    Text is flushed up to the last space (a word may still grow) or completely at a newline, and held back while it
    ends in an incomplete UTF-8 sequence. After a newline the held tokens are dropped but the newline token is kept
    as an anchor, so the tokenizer's "strip the leading space" rule cannot eat the next word's space (transformers'
    streamer loses it); the streamed text is exactly `decode(all new tokens)`.
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True, file=None):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.file = file
        self._reset()

    def _reset(self):
        self.anchor: list[int] = []
        self.tokens: list[int] = []
        self.printed = 0
        self.next_is_prompt = True

    def _text(self) -> str:
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        if not self.anchor:
            return decode(self.tokens)
        return decode(self.anchor + self.tokens)[len(decode(self.anchor)):]

    def put(self, value) -> None:
        value = np.asarray(value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        if self.skip_prompt and self.next_is_prompt:
            self.next_is_prompt = False
            return
        self.next_is_prompt = False
        self.tokens.extend(int(v) for v in value.reshape(-1))
        text = self._text()
        if text.endswith("\n"):
            printable = text[self.printed:]
            self.anchor, self.tokens, self.printed = self.tokens[-1:], [], 0
        elif text.endswith("\ufffd"):
            return
        else:
            cut = text.rfind(" ") + 1
            printable = text[self.printed:cut] if cut > self.printed else ""
            self.printed += len(printable)
        if printable:
            self.on_text(printable)

    def end(self) -> None:
        text = self._text() if self.tokens else ""
        self.on_text(text[self.printed:], stream_end=True)
        self._reset()

    def on_text(self, text: str, stream_end: bool = False) -> None:
        file = self.file if self.file is not None else sys.stdout
        print(text, end="\n" if stream_end else "", file=file, flush=True)
