"""Idefics2 (Mistral-7B) tokenizer on the Hugging Face `tokenizers` library, set up as transformers 5.x sets up
`LlamaTokenizer` (transformers itself runs this same Rust pipeline), without importing transformers.

The pipeline (`backend_tokenizer`), as `LlamaTokenizer.__init__` builds it:
- model: BPE(vocab, merges, byte_fallback=True, fuse_unk=True, no unk token, no dropout). From `tokenizer.json`
  (read with `Tokenizer.from_file`) or, without one, from `tokenizer.model`: sentencepiece loads the model and gives
  the pieces in id order; the merges are every split of a piece into two pieces, ranked by the id of the merged piece
  (`generate_merges`, as transformers' SentencePiece extractor; the piece scores are not used). This BPE is not
  SentencePiece's own encoder: they differ on whitespace runs ("a  b" -> "▁a", "▁▁", "b"; SentencePiece gives "▁a",
  "▁", "▁b"), so sentencepiece never encodes.
- no normalizer; pre-tokenizer Metaspace("▁", split=False) with prepend_scheme "first" (non-legacy: one "▁" only
  before the text segment that starts the input, unless it starts with "▁" already, so `<end_of_utterance>\\nAssistant:`
  -> `<0x0A>`, `Ass`, `istant`, `:`), "always" when legacy, "never" without add_prefix_space.
- added tokens, matched on the raw text first (leftmost longest): the tokenizer.json's, tokenizer_config.json's
  `added_tokens_decoder`, added_tokens.json, the SentencePiece control (special) and user-defined (not special)
  pieces, then the named special tokens (bos/eos/unk/pad, `additional_special_tokens`), so "<s>" typed in text is BOS.
- post-processor TemplateProcessing: BOS (add_bos_token) / EOS (add_eos_token) around the sequence.
- decoder Replace("▁", " ") -> ByteFallback -> Fuse -> Strip one leading space (with add_prefix_space): invalid UTF-8
  byte runs decode to one U+FFFD per byte; ids outside the vocabulary are dropped.
As in transformers 5.x, a tokenizer.json gives the model (vocab, merges) and added tokens only: its normalizer,
pre-tokenizer, decoder, post-processor, padding and truncation are replaced by the ones above.

Differences from transformers, on purpose: added tokens past the vocabulary must have consecutive ids (`tokenizers`
appends them in order; a gap is an error here instead of silently shifted ids); `all_special_ids` are the ids
`skip_special_tokens` skips (transformers also lists SentencePiece user-defined pieces, which it does not skip);
`additional_special_tokens` is the list from tokenizer_config.json / special_tokens_map.json. Batches are encoded
one text at a time and padded here (left by default).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .files import read_json

SPIECE_UNDERLINE = "▁"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json")
_CONTROL, _USER_DEFINED = 3, 4  # SentencePiece piece types


def generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary, ordered as transformers 5.x's converter orders them.

    Every split (l, r) of a piece with both halves in the vocabulary is a merge; merges are ranked by the id of the
    merged piece, then by len(l), len(r) (a stable sort over pieces in id order, splits sorted by (id(l), id(r))).
    """
    # (The per-piece sort of the splits by (id(l), id(r)) is left out: the ranking below overrides it.)
    merges = [(piece[:i], piece[i:], piece_id) for piece, piece_id in vocab.items() for i in range(1, len(piece))
              if piece[:i] in vocab and piece[i:] in vocab]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def _content(token) -> str | None:
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict):
        return token.get("content")
    return str(token)


def _read_sentencepiece(model_file: str) -> tuple[dict[str, int], list[dict]]:
    """Vocabulary (piece -> id) of a SentencePiece model, and its control / user-defined pieces as added tokens."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"Cannot read SentencePiece model {model_file!r}: {e}") from e
    pieces = sp.id_to_piece(list(range(sp.get_piece_size())))
    types = _piece_types(sp.serialized_model_proto())
    if len(types) != len(pieces):
        raise ValueError(f"Cannot read the piece types of SentencePiece model {model_file!r}.")
    added = [{"id": i, "content": p, "special": t == _CONTROL, "normalized": False}
             for i, (p, t) in enumerate(zip(pieces, types)) if t in (_CONTROL, _USER_DEFINED)]
    return {piece: i for i, piece in enumerate(pieces)}, added


def _piece_types(proto: bytes) -> list[int]:
    """`ModelProto.pieces[i].type` (field 1 of the model; field 3 of a piece, NORMAL=1 when absent), read from the
    protobuf wire format: sentencepiece's Python API does not tell user-defined pieces apart, and protobuf is not a
    dependency."""

    def varint(pos: int) -> tuple[int, int]:
        result = shift = 0
        while True:
            byte = proto[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7

    def skip(wire: int, pos: int) -> int:
        if wire == 0:
            return varint(pos)[1]
        if wire == 2:
            size, pos = varint(pos)
            return pos + size
        if wire in (1, 5):
            return pos + (8 if wire == 1 else 4)
        raise ValueError(f"unsupported protobuf wire type {wire}")

    types, pos = [], 0
    while pos < len(proto):
        key, pos = varint(pos)
        if key != 0x0A:  # not field 1 (a piece, length-delimited)
            pos = skip(key & 7, pos)
            continue
        size, pos = varint(pos)
        end, kind = pos + size, 1
        while pos < end:
            key, pos = varint(pos)
            if key == 0x18:  # field 3, varint
                kind, pos = varint(pos)
            else:
                pos = skip(key & 7, pos)
        types.append(kind)
    return types


def _bpe_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> Tokenizer:
    return Tokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], fuse_unk=True,
                                byte_fallback=True, dropout=None))


class _PipelineSetting:
    """An attribute whose assignment rebuilds the backend's pre-tokenizer, decoder and post-processor."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj, value):
        setattr(obj, self.slot, value)
        obj._sync()


class Idefics2Tokenizer:
    """Tokenizer with the transformers-5.x behaviour: BOS added, left padding, special tokens split out of text."""

    add_bos_token = _PipelineSetting()
    add_eos_token = _PipelineSetting()
    legacy = _PipelineSetting()
    add_prefix_space = _PipelineSetting()
    bos_token = _PipelineSetting()
    eos_token = _PipelineSetting()

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
        self._setup(_bpe_backend(vocab, merges), added_tokens=added_tokens, bos_token=bos_token, eos_token=eos_token,
                    unk_token=unk_token, pad_token=pad_token, additional_special_tokens=additional_special_tokens,
                    add_bos_token=add_bos_token, add_eos_token=add_eos_token, legacy=legacy,
                    add_prefix_space=add_prefix_space, padding_side=padding_side, source_dir=source_dir)

    @classmethod
    def _from_backend(cls, backend: Tokenizer, **kwargs) -> "Idefics2Tokenizer":
        self = cls.__new__(cls)
        self._setup(backend, **kwargs)
        return self

    def _setup(self, backend: Tokenizer, added_tokens: Iterable[dict] = (), bos_token: str | None = "<s>",
               eos_token: str | None = "</s>", unk_token: str | None = "<unk>", pad_token: str | None = None,
               additional_special_tokens: Sequence[str] = (), add_bos_token: bool = True, add_eos_token: bool = False,
               legacy: bool = False, add_prefix_space: bool | None = None, padding_side: str = "left",
               source_dir: str | None = None) -> None:
        self._ready = False
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.legacy = bool(legacy)
        self.add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        self.padding_side = padding_side
        self.source_dir = source_dir
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)

        self._backend = backend
        backend.normalizer = None
        backend.no_padding()
        backend.no_truncation()
        self.vocab = backend.get_vocab(with_added_tokens=False)
        for tok in added_tokens:
            self._register(tok["content"], tok.get("id"), tok.get("special", True), tok.get("lstrip", False),
                           tok.get("rstrip", False), tok.get("single_word"), tok.get("normalized"))
        for tok in (bos_token, eos_token, unk_token, pad_token, *self.additional_special_tokens):
            if tok is not None:
                self._register(tok, None, True)
        self._ready = True
        self._sync()

    def _sync(self) -> None:
        """Pre-tokenizer, decoder and post-processor from the current settings, as `LlamaTokenizer` sets them."""
        if not getattr(self, "_ready", False):
            return
        scheme = ("always" if self.legacy else "first") if self.add_prefix_space else "never"
        self._backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme=scheme,
                                                               split=False)
        steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        self._backend.decoder = decoders.Sequence(steps)

        # As before: no BOS / EOS when the token is unset or has no id (unknown, and no unk token either).
        bos = self.bos_token if self.add_bos_token and self.bos_token_id is not None else None
        eos = self.eos_token if self.add_eos_token and self.eos_token_id is not None else None
        single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
        pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
        special = [(t, self.convert_tokens_to_ids(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
        try:
            self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                         special_tokens=special)
        except Exception as e:  # `tokenizers` raises a bare Exception for a token its template syntax cannot hold
            raise ValueError(f"Cannot build the BOS/EOS template for {bos!r} / {eos!r}: {e}") from e

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` that encodes and decodes (transformers' name for it)."""
        return self._backend

    @property
    def bpe(self) -> models.BPE:
        """The backend's BPE model (a `tokenizers.models.BPE`)."""
        return self._backend.model

    # ------------------------------------------------------------------------------------------- added tokens
    def __len__(self) -> int:
        return max([self._backend.get_vocab_size(with_added_tokens=False),
                    *(i + 1 for i in self._backend.get_added_tokens_decoder())])

    def _register(self, content: str, token_id: int | None, special: bool, lstrip: bool = False,
                  rstrip: bool = False, single_word: bool | None = None, normalized: bool | None = None) -> int:
        """Add (or update) an added token; flags not given keep their current value, and special stays special."""
        current_id = self._backend.token_to_id(content)
        current = self._backend.get_added_tokens_decoder().get(current_id) if current_id is not None else None
        if current is not None:
            special = special or current.special
            if not (lstrip or rstrip):
                lstrip, rstrip = current.lstrip, current.rstrip
            single_word = current.single_word if single_word is None else single_word
            normalized = current.normalized if normalized is None else normalized
        token = AddedToken(content, single_word=bool(single_word), lstrip=bool(lstrip), rstrip=bool(rstrip),
                           normalized=bool(normalized), special=bool(special))
        if current is None or repr(current) != repr(token):
            (self._backend.add_special_tokens if special else self._backend.add_tokens)([token])
        new_id = self._backend.token_to_id(content)
        if token_id is not None and new_id != int(token_id):
            raise ValueError(f"Added token {content!r} should have id {token_id} but gets id {new_id}: tokens past "
                             f"the vocabulary need consecutive ids, and an id inside it must be that same piece.")
        return new_id

    def add_special_tokens(self, tokens: Sequence[str]) -> int:
        """Register special tokens (new ones get the next free ids, like transformers); returns how many were new."""
        new = 0
        for tok in tokens:
            if tok not in set(self.added_tokens.values()):
                new += 1
            self._register(tok, None, True)
            if tok not in self.additional_special_tokens and tok not in (self.bos_token, self.eos_token,
                                                                         self.unk_token, self.pad_token):
                self.additional_special_tokens.append(tok)
        self._sync()  # a BOS/EOS token that was unknown until now gets its id in the template
        return new

    @property
    def added_tokens(self) -> dict[int, str]:
        return {i: t.content for i, t in sorted(self._backend.get_added_tokens_decoder().items())}

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    unk_token_id = property(lambda self: self._id_of(self.unk_token))
    pad_token_id = property(lambda self: self._id_of(self.pad_token))

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None and tokens != self.unk_token else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]):
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token(int(ids))
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id) if 0 <= token_id < 2**32 else None

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Idefics2Tokenizer":
        """Load from a directory with `tokenizer.model` and/or `tokenizer.json` plus the usual JSON side files.

        As in transformers 5.x, a `tokenizer.json` provides the vocabulary, merges and added tokens when present (its
        merges may be ordered differently from the ones derived from `tokenizer.model`); otherwise they come from
        `tokenizer.model`.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"Tokenizer directory not found: {path!r}")
        config = read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = read_json(os.path.join(path, "special_tokens_map.json"))
        json_file = os.path.join(path, "tokenizer.json")
        model_file = os.path.join(path, "tokenizer.model")

        backend, added = None, {}
        if os.path.isfile(json_file):
            try:
                backend = Tokenizer.from_file(json_file)
            except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot read
                if not os.path.isfile(model_file):
                    raise ValueError(f"Cannot read {json_file!r} (and there is no tokenizer.model): {e}") from e
            if backend is not None and isinstance(backend.model, models.BPE):
                # The BPE transformers rebuilds from the file's vocab and merges: byte fallback, no unk, no dropout.
                model = backend.model
                model.unk_token, model.dropout, model.fuse_unk, model.byte_fallback = None, None, True, True
                model.continuing_subword_prefix, model.end_of_word_suffix, model.ignore_merges = None, None, False
            else:
                backend = None
        if backend is None:
            if not os.path.isfile(model_file):
                raise ValueError(f"No tokenizer.model (or BPE tokenizer.json) in {path!r}.")
            vocab, spm_added = _read_sentencepiece(model_file)
            backend = _bpe_backend(vocab, generate_merges(vocab))
            added = {tok["id"]: tok for tok in spm_added}

        for token_id, tok in (config.get("added_tokens_decoder") or {}).items():
            added[int(token_id)] = {**tok, "id": int(token_id)}
        for content, token_id in read_json(os.path.join(path, "added_tokens.json")).items():
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
        return cls._from_backend(backend, added_tokens=[added[i] for i in sorted(added)], source_dir=path, **kwargs)

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
        config = read_json(os.path.join(self.source_dir, "tokenizer_config.json")) if self.source_dir else {}
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
                str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(self._backend.get_added_tokens_decoder().items())
            },
        }

    # ------------------------------------------------------------------------------------------------ encoding
    def tokenize_ids(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        if not isinstance(text, str):
            raise ValueError(f"Text must be a str, got {type(text).__name__}.")
        return self._backend.encode(text, add_special_tokens=False).ids

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.tokenize_ids(text))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"Text must be a str, got {type(text).__name__}.")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple]]:
        """Token ids and each token's (start, end) character span in `text` (special tokens added: (0, 0))."""
        if not isinstance(text, str):
            raise ValueError(f"Text must be a str, got {type(text).__name__}.")
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

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
        # One text at a time: `encode_batch` would start the backend's thread pool, and a process that forks after
        # that (subprocess, multiprocessing) gets the backend's "disabling parallelism" warning.
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
        ids = [i for i in (int(i) for i in np.asarray(ids).reshape(-1).tolist()) if 0 <= i < 2**32]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]
