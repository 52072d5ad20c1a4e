"""idefics2-jax: Idefics2 (SigLIP/NaViT vision tower, Perceiver resampler, Mistral-7B decoder) in JAX/Flax."""

from .config import Idefics2Config, PerceiverConfig, TextConfig, VisionConfig
from .loading import load_model
from .model import Idefics2ForConditionalGeneration, Idefics2Output

__all__ = [
    "Idefics2Config",
    "VisionConfig",
    "PerceiverConfig",
    "TextConfig",
    "Idefics2ForConditionalGeneration",
    "Idefics2Output",
    "load_model",
]
