"""Idefics2 (Mistral-7B) tokenizer without transformers: reproduces transformers 5.x `LlamaTokenizer` exactly.

Parity traps (REFERENCE §7), all checked against transformers in tests/test_tokenizer.py:
- transformers 5.x does not run SentencePiece: it converts `tokenizer.model` into a `tokenizers` BPE (merges ranked
  by the id of the merged piece) and that BPE differs from SentencePiece's own encoder, e.g. on whitespace runs
  ("a  b" -> "▁a", "▁▁", "b"; SentencePiece gives "▁a", "▁", "▁b"). So sentencepiece is only used to read the
  vocabulary; encoding is the same BPE as `tokenizers` (lowest merge rank first, leftmost on ties, byte fallback).
- Non-legacy Metaspace ("first"): spaces become "▁" and one "▁" is prepended only to the text segment that starts the
  input, and only if it does not already start with "▁" (so " a" -> "▁a", not "▁▁a"). Segments after a special token
  get none (`<end_of_utterance>\nAssistant:` -> `<0x0A>`, `Ass`, `istant`, `:`).
- Added tokens (special tokens included: "<s>" typed in text is BOS) are cut out of the raw text first, leftmost
  longest match.
- Decoding runs every kept token, added tokens too, through Replace("▁", " ") -> ByteFallback -> Fuse -> Strip one
  leading space; invalid UTF-8 byte runs decode to one U+FFFD per byte; ids outside the vocabulary are dropped.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
from typing import Any, Iterable, Sequence

import numpy as np

SPIECE_UNDERLINE = "▁"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary, ordered as transformers 5.x's converter orders them.

    Every split (l, r) of a piece with both halves in the vocabulary is a merge; merges are ranked by the id of the
    merged piece, then by len(l), len(r) (a stable sort over pieces in id order, splits sorted by (id(l), id(r))).
    """
    merges = []
    for piece, piece_id in vocab.items():
        local = [(piece[:i], piece[i:], piece_id) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


class BPE:
    """The `tokenizers` BPE model (no dropout, byte fallback, no unk): piece ids of one pre-tokenized word."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], byte_fallback: bool = True,
                 unk_id: int | None = None):
        self.vocab = vocab
        self.byte_fallback = byte_fallback
        self.unk_id = unk_id
        # (left id, right id) -> (rank, merged id), as `tokenizers` builds its merge map.
        self.merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(merges):
            merged = vocab.get(left + right)
            if left in vocab and right in vocab and merged is not None:
                self.merges.setdefault((vocab[left], vocab[right]), (rank, merged))
        self._byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._cache: dict[str, list[int]] = {}

    def _symbols(self, word: str) -> list[int]:
        ids = []
        for ch in word:
            i = self.vocab.get(ch)
            if i is not None:
                ids.append(i)
                continue
            if self.byte_fallback:
                byte_ids = [self._byte_ids[b] for b in ch.encode("utf-8")]
                if None not in byte_ids:
                    ids.extend(byte_ids)
                    continue
            if self.unk_id is None:
                raise ValueError(f"Character {ch!r} is not in the vocabulary and there is no unknown token.")
            if not ids or ids[-1] != self.unk_id:  # consecutive unknowns fuse into one, as fuse_unk does
                ids.append(self.unk_id)
        return ids

    def encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return list(cached)
        ids = self._symbols(word)
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = self.merges.get((ids[i], ids[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        # Lowest rank first, leftmost on ties; entries made stale by earlier merges are skipped when popped.
        while heap:
            rank, i, merged = heapq.heappop(heap)
            if not alive[i] or nxt[i] >= n:
                continue
            j = nxt[i]
            m = self.merges.get((ids[i], ids[j]))
            if m is None or m[1] != merged:
                continue
            ids[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                m = self.merges.get((ids[prv[i]], merged))
                if m is not None:
                    heapq.heappush(heap, (m[0], prv[i], m[1]))
            if nxt[i] < n:
                m = self.merges.get((merged, ids[nxt[i]]))
                if m is not None:
                    heapq.heappush(heap, (m[0], i, m[1]))
        out = [ids[i] for i in range(n) if alive[i]]
        if len(word) < 256 and len(self._cache) < 10_000:
            self._cache[word] = out
        return list(out)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _content(token) -> str | None:
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict):
        return token.get("content")
    return str(token)


def _sentencepiece_vocab(model_file: str) -> list[str]:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"Cannot read SentencePiece model {model_file!r}: {e}") from e
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


class Idefics2Tokenizer:
    """Tokenizer with the transformers-5.x behaviour: BOS added, left padding, special tokens split out of text."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        added_tokens: Iterable[dict] = (),
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool = False,
        add_prefix_space: bool | None = None,
        padding_side: str = "left",
        source_dir: str | None = None,
    ):
        self.vocab = dict(vocab)
        self.bpe = BPE(self.vocab, merges, byte_fallback=True)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.legacy = bool(legacy)
        self.add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        self.padding_side = padding_side
        self.source_dir = source_dir
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)

        self._split_re: re.Pattern | None = None
        self._split_tokens: list[str] = []
        self._id_to_added: dict[int, str] = {}
        self._added_to_id: dict[str, int] = {}
        self._special_ids: set[int] = set()
        self._strip: dict[str, tuple[bool, bool]] = {}
        for tok in added_tokens:
            self._register(tok["content"], tok.get("id"), tok.get("special", True),
                           tok.get("lstrip", False), tok.get("rstrip", False))
        for tok in (bos_token, eos_token, unk_token, pad_token, *self.additional_special_tokens):
            if tok is not None:
                self._register(tok, None, True)

    # ------------------------------------------------------------------------------------------- added tokens
    def __len__(self) -> int:
        return max([len(self.vocab), *(i + 1 for i in self._id_to_added)])

    def _register(self, content: str, token_id: int | None, special: bool, lstrip: bool = False,
                  rstrip: bool = False) -> int:
        if token_id is None:
            token_id = self._added_to_id.get(content, self.vocab.get(content))
        if token_id is None:
            token_id = len(self)
        self._id_to_added[token_id] = content
        self._added_to_id[content] = token_id
        if content not in self._strip or lstrip or rstrip:
            self._strip[content] = (bool(lstrip), bool(rstrip))
        if special:
            self._special_ids.add(token_id)
        self._split_re = None
        return token_id

    def add_special_tokens(self, tokens: Sequence[str]) -> int:
        """Register special tokens (new ones get the next free ids, like transformers); returns how many were new."""
        new = 0
        for tok in tokens:
            if tok not in self._added_to_id:
                new += 1
            self._register(tok, None, True)
            if tok not in self.additional_special_tokens and tok not in (self.bos_token, self.eos_token,
                                                                         self.unk_token, self.pad_token):
                self.additional_special_tokens.append(tok)
        return new

    @property
    def added_tokens(self) -> dict[int, str]:
        return dict(sorted(self._id_to_added.items()))

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    unk_token_id = property(lambda self: self._id_of(self.unk_token))
    pad_token_id = property(lambda self: self._id_of(self.pad_token))

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            token_id = self._added_to_id.get(tokens, self.vocab.get(tokens))
            return self.unk_token_id if token_id is None and tokens != self.unk_token else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]):
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token(int(ids))
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, token_id: int) -> str | None:
        if token_id in self._id_to_added:
            return self._id_to_added[token_id]
        if not hasattr(self, "_pieces"):
            self._pieces = {i: p for p, i in self.vocab.items()}
        return self._pieces.get(token_id)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Idefics2Tokenizer":
        """Load from a directory with `tokenizer.model` and/or `tokenizer.json` plus the usual JSON side files.

        As in transformers 5.x, a `tokenizer.json` provides the vocabulary and merges when present (its merges may be
        ordered differently from the ones derived from `tokenizer.model`); otherwise they come from `tokenizer.model`.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"Tokenizer directory not found: {path!r}")
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        tokenizer_json = _read_json(os.path.join(path, "tokenizer.json"))
        model_file = os.path.join(path, "tokenizer.model")

        model = tokenizer_json.get("model") or {}
        if model.get("type") == "BPE" and model.get("vocab"):
            vocab = dict(model["vocab"])
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        elif os.path.isfile(model_file):
            vocab = {piece: i for i, piece in enumerate(_sentencepiece_vocab(model_file))}
            merges = generate_merges(vocab)
        else:
            raise ValueError(f"No tokenizer.model (or BPE tokenizer.json) in {path!r}.")

        added: dict[int, dict] = {}
        for tok in tokenizer_json.get("added_tokens", []):
            added[int(tok["id"])] = tok
        for token_id, tok in (config.get("added_tokens_decoder") or {}).items():
            added[int(token_id)] = {**tok, "id": int(token_id)}
        for content, token_id in _read_json(os.path.join(path, "added_tokens.json")).items():
            added.setdefault(int(token_id), {"id": int(token_id), "content": content, "special": True})

        def pick(name, default=None):
            value = config.get(name, special_map.get(name, default))
            return _content(value)

        extra = config.get("additional_special_tokens", special_map.get("additional_special_tokens")) or []
        kwargs = dict(
            bos_token=pick("bos_token", "<s>"),
            eos_token=pick("eos_token", "</s>"),
            unk_token=pick("unk_token", "<unk>"),
            pad_token=pick("pad_token"),
            additional_special_tokens=[_content(t) for t in extra],
            add_bos_token=config.get("add_bos_token", True),
            add_eos_token=config.get("add_eos_token", False),
            legacy=config.get("legacy", False),
            add_prefix_space=config.get("add_prefix_space"),
            padding_side=config.get("padding_side", "left"),
        )
        kwargs.update(overrides)
        return cls(vocab, merges, added_tokens=[added[i] for i in sorted(added)], source_dir=path, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Copy the tokenizer files this was loaded from and write a `tokenizer_config.json` describing it."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        written = []
        if self.source_dir is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(self.source_dir, name)
                if os.path.isfile(src) and name != "tokenizer_config.json":
                    dst = os.path.join(directory, name)
                    if os.path.abspath(src) != os.path.abspath(dst):
                        shutil.copyfile(src, dst)
                    written.append(dst)
        if not any(os.path.basename(w) in ("tokenizer.model", "tokenizer.json") for w in written):
            raise ValueError("Nothing to save: this tokenizer was not loaded from a tokenizer.model / tokenizer.json.")
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = _read_json(os.path.join(self.source_dir, "tokenizer_config.json")) if self.source_dir else {}
        config.update(self.to_config())
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return written + [config_path]

    def to_config(self) -> dict:
        return {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "legacy": self.legacy,
            "add_prefix_space": self.add_prefix_space,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": False,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": list(self.additional_special_tokens),
            "added_tokens_decoder": {
                str(i): {"content": c, "lstrip": self._strip[c][0], "normalized": False, "rstrip": self._strip[c][1],
                         "single_word": False, "special": i in self._special_ids}
                for i, c in self.added_tokens.items()
            },
        }

    # ------------------------------------------------------------------------------------------------ encoding
    def _splitter(self) -> re.Pattern:
        if self._split_re is None:
            # Longest first: at any position the longest added token wins, as in `tokenizers` (leftmost-longest).
            self._split_tokens = sorted(self._added_to_id, key=len, reverse=True)
            parts = []
            for content in self._split_tokens:
                lstrip, rstrip = self._strip[content]
                parts.append(("\\s*" if lstrip else "") + "(" + re.escape(content) + ")" + ("\\s*" if rstrip else ""))
            self._split_re = re.compile("|".join(parts)) if parts else re.compile("(?!)")
        return self._split_re

    def _pretokenize(self, segment: str, starts_input: bool) -> str:
        segment = segment.replace(" ", SPIECE_UNDERLINE)
        if self.add_prefix_space and (starts_input or self.legacy) and not segment.startswith(SPIECE_UNDERLINE):
            segment = SPIECE_UNDERLINE + segment
        return segment

    def tokenize_ids(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        if not isinstance(text, str):
            raise ValueError(f"Text must be a str, got {type(text).__name__}.")
        ids: list[int] = []
        pos = 0
        for match in self._splitter().finditer(text):
            if match.start() > pos:
                ids += self.bpe.encode_word(self._pretokenize(text[pos:match.start()], pos == 0))
            ids.append(self._added_to_id[self._split_tokens[match.lastindex - 1]])
            pos = match.end()
        if pos < len(text):
            ids += self.bpe.encode_word(self._pretokenize(text[pos:], pos == 0))
        return ids

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.tokenize_ids(text))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenize_ids(text)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> dict:
        """Encode one text or a batch. Returns {"input_ids", "attention_mask"}: lists, or int64 arrays with
        return_tensors="np" ("jax" for jax arrays). `padding=True`/"longest" pads to the longest sample."""
        if kwargs:
            raise ValueError(f"Unexpected arguments: {sorted(kwargs)}.")
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise ValueError("Text must be a str or a list of str.")
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        masks = [[1] * len(x) for x in ids]
        if padding not in (False, None, "do_not_pad"):
            if padding not in (True, "longest"):
                raise ValueError(f"padding must be True, False or 'longest', got {padding!r}.")
            if self.pad_token_id is None:
                raise ValueError("This tokenizer has no pad token, so it cannot pad; set tokenizer.pad_token.")
            side = padding_side or self.padding_side
            longest = max(len(x) for x in ids)
            for x, m in zip(ids, masks):
                fill = longest - len(x)
                if side == "left":
                    x[:0], m[:0] = [self.pad_token_id] * fill, [0] * fill
                else:
                    x += [self.pad_token_id] * fill
                    m += [0] * fill
        out = {"input_ids": ids, "attention_mask": masks}
        if return_tensors is None:
            return {k: v[0] for k, v in out.items()} if single else out
        if len({len(x) for x in ids}) > 1:
            raise ValueError("Sequences have different lengths; pass padding=True to make a tensor.")
        if return_tensors == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        if return_tensors == "jax":
            import jax.numpy as jnp

            return {k: jnp.asarray(np.asarray(v, dtype=np.int32)) for k, v in out.items()}
        raise ValueError(f"return_tensors must be 'np', 'jax' or None, got {return_tensors!r}.")

    # ------------------------------------------------------------------------------------------------ decoding
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, (int, np.integer)):
            ids = [ids]
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        pieces = []
        for i in ids:
            if skip_special_tokens and i in self._special_ids:
                continue
            token = self._id_to_token(i)
            if token is not None:
                pieces.append(token.replace(SPIECE_UNDERLINE, " "))
        text = "".join(_byte_fallback(pieces))
        if self.add_prefix_space and text.startswith(" "):
            text = text[1:]
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]


def _byte_fallback(pieces: list[str]) -> list[str]:
    """`tokenizers`' ByteFallback decoder: runs of <0xNN> pieces become UTF-8 text, or one U+FFFD per byte."""
    out, run = [], bytearray()

    def flush():
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(run))
            run.clear()

    for piece in pieces:
        m = _BYTE_TOKEN.fullmatch(piece) if len(piece) == 6 else None
        if m is not None:
            run.append(int(m.group(1), 16))
        else:
            flush()
            out.append(piece)
    flush()
    return out
