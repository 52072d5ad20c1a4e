"""idefics2-jax: Idefics2 (SigLIP/NaViT vision tower, Perceiver resampler, Mistral-7B decoder) in JAX/Flax."""

from .config import Idefics2Config, PerceiverConfig, TextConfig, VisionConfig
from .generate import GenerationConfig, TextStreamer, generate
from .image_processing import Idefics2ImageProcessor
from .loading import load_model
from .model import Idefics2ForConditionalGeneration, Idefics2Output
from .processing import Idefics2Processor
from .tokenizer import Idefics2Tokenizer

__all__ = [
    "Idefics2Config",
    "VisionConfig",
    "PerceiverConfig",
    "TextConfig",
    "Idefics2ForConditionalGeneration",
    "Idefics2Output",
    "load_model",
    "Idefics2ImageProcessor",
    "Idefics2Processor",
    "Idefics2Tokenizer",
    "generate",
    "GenerationConfig",
    "TextStreamer",
]
