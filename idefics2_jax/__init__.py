"""idefics2-jax: Idefics2 (SigLIP/NaViT vision tower, Perceiver resampler, Mistral-7B decoder) in JAX/Flax."""

from .config import Idefics2Config, PerceiverConfig, TextConfig, VisionConfig
from .finetune import LoraConfig, lora
from .generation import GenerationConfig, TextStreamer, generate
from .loading import load_model, save_pretrained
from .nn.model import Idefics2ForConditionalGeneration, Idefics2Output
from .processing import Idefics2ImageProcessor, Idefics2Processor, Idefics2Tokenizer

__all__ = [
    "Idefics2Config",
    "VisionConfig",
    "PerceiverConfig",
    "TextConfig",
    "Idefics2ForConditionalGeneration",
    "Idefics2Output",
    "load_model",
    "save_pretrained",
    "Idefics2ImageProcessor",
    "Idefics2Processor",
    "Idefics2Tokenizer",
    "generate",
    "GenerationConfig",
    "TextStreamer",
    "LoraConfig",
    "lora",
]
