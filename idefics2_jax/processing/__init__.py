"""Preprocessing (imports no model code): the tokenizer, the image processor, and the processor that combines them
with the chat template, laid out as transformers 5.x lays them out."""

from .image_processing import Idefics2ImageProcessor, load_image_file
from .processor import DEFAULT_CHAT_TEMPLATE, Idefics2Processor
from .tokenizer import Idefics2Tokenizer

__all__ = ["DEFAULT_CHAT_TEMPLATE", "Idefics2ImageProcessor", "Idefics2Processor", "Idefics2Tokenizer",
           "load_image_file"]
