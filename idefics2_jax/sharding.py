"""The old name of the sharding helpers, kept so that existing user code runs: everything here lives in
`idefics2_jax.nn.partitioning` (axis names, rules, meshes, `constrain`, input shardings) and
`idefics2_jax.ckpt.placement` (params and KV caches on a mesh). No module of the package imports this one."""

from .ckpt.placement import (init_cache, param_axes, param_shardings, param_specs,  # noqa: F401
                             shard_params)
from .nn.partitioning import (CACHE_KV_AXES, CACHE_POS_AXES, CACHE_VALID_AXES, DEFAULT_RULES,  # noqa: F401
                              HIDDEN_AXES, INPUT_AXES, LOGITS_AXES, MESH_AXES, VISION_TENSOR_PARALLEL_RULES,
                              cache_shardings, constrain, constrain_cache, current_rules, data_sharding,
                              logical_to_spec, make_mesh, mesh_context, mesh_of, named_sharding, shard_batch,
                              shard_shape, use_mesh, use_rules)
