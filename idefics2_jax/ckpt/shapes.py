"""The model's param shapes, from `jax.eval_shape` of its init (no memory allocated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from ..config import Idefics2Config
from ..nn.model import Idefics2ForConditionalGeneration

def param_shapes(config: Idefics2Config) -> dict[tuple, tuple]:
    """{param path: shape} computed with jax.eval_shape (no memory allocated)."""
    tree = abstract_params(config, jnp.float32)
    return {k: tuple(v.shape) for k, v in flatten_dict(tree).items()}


def abstract_params(config: Idefics2Config, dtype=jnp.float32):
    """The param tree as ShapeDtypeStructs (no memory allocated)."""
    model = Idefics2ForConditionalGeneration(config, dtype=dtype)
    p = config.vision_config.patch_size
    ids = jnp.zeros((1, config.image_seq_len), jnp.int32) + config.image_token_id
    pixels = jnp.ones((1, 1, config.vision_config.num_channels, p, p), dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, pixel_values=pixels))
    return variables["params"]

