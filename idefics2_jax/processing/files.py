"""Reading the JSON side files of a checkpoint directory (tokenizer, processor and image processor configs)."""

from __future__ import annotations

import json
import os


def read_json(path: str) -> dict:
    """The JSON object in `path`, {} if there is no such file; a ValueError naming the file if it is not one."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return content
