"""Fine-tuning: LoRA adapters (PEFT's format and meaning), TRL-format data with answer-only labels."""

from . import lora
from .data import collate, read_jsonl
from .lora import LoraConfig

__all__ = ["lora", "LoraConfig", "collate", "read_jsonl"]
