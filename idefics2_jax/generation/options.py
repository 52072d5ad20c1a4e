"""`GenerationConfig`: generation options, read from a checkpoint's generation_config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from ..config import Idefics2Config

GENERATION_CONFIG = "generation_config.json"
# transformers' `GenerationConfig._get_default_generation_params()` for the options implemented here.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


# ------------------------------------------------------------------------------------------ generation config
def token_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (int, np.integer)):
        return (int(ids),)
    return tuple(int(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The generation_config.json fields `generate` uses; unset fields take transformers' global defaults."""

    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    do_sample: bool = HF_DEFAULTS["do_sample"]
    temperature: float = HF_DEFAULTS["temperature"]
    top_k: int | None = HF_DEFAULTS["top_k"]
    top_p: float = HF_DEFAULTS["top_p"]
    repetition_penalty: float = HF_DEFAULTS["repetition_penalty"]
    max_new_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        d = {k: v for k, v in d.items() if v is not None}
        kw: dict[str, Any] = {}
        for name in ("bos_token_id", "pad_token_id", "top_k", "max_new_tokens"):
            if name in d:
                kw[name] = int(d[name])
        for name in ("temperature", "top_p", "repetition_penalty"):
            if name in d:
                kw[name] = float(d[name])
        if "do_sample" in d:
            kw["do_sample"] = bool(d["do_sample"])
        if "eos_token_id" in d:
            kw["eos_token_id"] = token_ids(d["eos_token_id"])
        if "bad_words_ids" in d:
            kw["bad_words_ids"] = tuple(tuple(int(t) for t in w) for w in d["bad_words_ids"])
        return cls(**kw)

    def to_dict(self) -> dict:
        """generation_config.json as transformers writes it: the fields that differ from its defaults."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value == field.default or value is None or value == ():
                continue
            if field.name == "eos_token_id":
                value = value[0] if len(value) == 1 else list(value)
            elif field.name == "bad_words_ids":
                value = [list(w) for w in value]
            out[field.name] = value
        return out

    @classmethod
    def from_model_config(cls, config: Idefics2Config) -> "GenerationConfig":
        """What transformers uses when a checkpoint has no generation_config.json: the text config's special ids."""
        t = config.text_config
        return cls(bos_token_id=t.bos_token_id, eos_token_id=token_ids(t.eos_token_id), pad_token_id=t.pad_token_id)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GenerationConfig":
        """generation_config.json of a checkpoint directory; without one, config.json's top level, then its
        text_config (as transformers' `GenerationConfig.from_model_config`)."""
        path = os.fspath(path)
        file = os.path.join(path, GENERATION_CONFIG)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no {GENERATION_CONFIG} or config.json in {path}")
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
        base = dataclasses.asdict(cls.from_model_config(Idefics2Config.from_dict(raw)))
        top = {k: v for k, v in raw.items() if k in base and v is not None}
        return cls.from_dict({**base, **top})


def load_generation_config(path: str | os.PathLike) -> GenerationConfig:
    return GenerationConfig.from_pretrained(path)


def resolve_generation_config(model, generation_config=None) -> GenerationConfig:
    """What `generate` (and `save_pretrained`) use: `generation_config` (a GenerationConfig, a dict, or a checkpoint
    directory); else `model.generation_config` (what `load_model` read); else the model config's special ids."""
    if generation_config is None:
        return getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    if isinstance(generation_config, GenerationConfig):
        return generation_config
    if isinstance(generation_config, dict):
        return GenerationConfig.from_dict(generation_config)
    return GenerationConfig.from_pretrained(generation_config)
