"""The network: logical-axis partitioning, layers, the one attention function, and one file per architectural block
(vision tower, connector, text decoder, the full model)."""

from .model import Idefics2ForConditionalGeneration, Idefics2Output

__all__ = ["Idefics2ForConditionalGeneration", "Idefics2Output"]
