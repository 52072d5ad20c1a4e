"""Idefics2 configuration: frozen dataclasses read from a Hugging Face `config.json`.

Omitted fields resolve exactly as transformers 5.x resolves them (see `from_dict`), because the hub files set only a
few fields and everything else comes from class defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

MODEL_TYPE = "idefics2"


def _single_int(value, name: str) -> int:
    # HF allows `image_size` / `patch_size` as int or (h, w); only square ones exist for Idefics2.
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {name}={value!r} is not supported")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower with NaViT position bucketing (defaults: transformers' `Idefics2VisionConfig`)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Perceiver resampler (defaults: transformers' `Idefics2PerceiverConfig`)."""

    hidden_act: str = "silu"
    hidden_size: int = 4096
    rms_norm_eps: float = 1e-6
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Mistral decoder (defaults: transformers' `MistralConfig`)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096


@dataclasses.dataclass(frozen=True)
class Idefics2Config:
    vision_config: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    perceiver_config: PerceiverConfig = dataclasses.field(default_factory=PerceiverConfig)
    text_config: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_id: int = 32001
    tie_word_embeddings: bool = False
    # The checkpoint's stored dtype ("float32", "bfloat16", ...), used when load_model is given dtype=None.
    dtype: str | None = None

    @property
    def image_seq_len(self) -> int:
        return self.perceiver_config.resampler_n_latents

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Idefics2Config":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"config.json has model_type={model_type!r}; idefics2-jax loads only model_type='idefics2' "
                "checkpoints (Idefics2ForConditionalGeneration)"
            )
        vision = _build(VisionConfig, d.get("vision_config"), {})
        vision = dataclasses.replace(
            vision,
            image_size=_single_int(vision.image_size, "image_size"),
            patch_size=_single_int(vision.patch_size, "patch_size"),
        )
        perceiver = _build(PerceiverConfig, d.get("perceiver_config"), {})
        if d.get("text_config") is None:
            # transformers' SubConfigSpec: these init kwargs apply only when text_config is absent altogether.
            text_raw: dict = {"max_position_embeddings": 4096 * 8, "rms_norm_eps": 1e-5, "pad_token_id": 0}
        else:
            text_raw = dict(d["text_config"])
            if text_raw.get("model_type", "mistral") != "mistral":
                raise ValueError(f"text_config.model_type={text_raw['model_type']!r}: only 'mistral' is supported")
        text = _text_config(text_raw)
        if text.hidden_size != perceiver.hidden_size:
            # transformers 5.x (Idefics2Config.__post_init__): a perceiver whose hidden size was left at its default
            # takes the text hidden size *and* the text eps.
            perceiver = dataclasses.replace(perceiver, hidden_size=text.hidden_size, rms_norm_eps=text.rms_norm_eps)
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vision_config=vision,
            perceiver_config=perceiver,
            text_config=text,
            image_token_id=int(d.get("image_token_id", 32001)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            dtype=str(dtype) if dtype is not None else None,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Idefics2Config":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Idefics2Config":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_json_file(file)

    def to_dict(self) -> dict:
        """An HF-style dict that `from_dict` (and transformers) read back to the same values."""
        text = dataclasses.asdict(self.text_config)
        text["model_type"] = "mistral"
        if isinstance(text["eos_token_id"], tuple):
            text["eos_token_id"] = list(text["eos_token_id"])
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
        out = {
            "model_type": MODEL_TYPE,
            "architectures": ["Idefics2ForConditionalGeneration"],
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": dataclasses.asdict(self.vision_config),
            "perceiver_config": dataclasses.asdict(self.perceiver_config),
            "text_config": text,
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out


def _build(cls, raw: Mapping[str, Any] | None, extra: dict):
    raw = dict(raw or {})
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**raw, **extra}.items() if k in names})


def _text_config(raw: dict) -> TextConfig:
    raw = dict(raw)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"text_config rope_type={rope_type!r}: only the default RoPE is implemented")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    cfg = _build(TextConfig, raw, {"rope_theta": float(theta)})
    if raw.get("head_dim") is None:
        cfg = dataclasses.replace(cfg, head_dim=cfg.hidden_size // cfg.num_attention_heads)
    if raw.get("num_key_value_heads", 8) is None:
        cfg = dataclasses.replace(cfg, num_key_value_heads=cfg.num_attention_heads)
    if isinstance(cfg.eos_token_id, list):
        cfg = dataclasses.replace(cfg, eos_token_id=tuple(cfg.eos_token_id))
    return cfg
