"""The package's imports go one way: config <- nn <- ckpt <- generation <- CLI, processing beside them.

Read with `ast` (module level and inside functions), so a cycle hidden in a function body fails here too.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("idefics2_jax", "convert")
# Layers, lowest first: a module may import only from its own layer or lower ones ("processing" sits beside the model
# layers and may import only config). `sharding` is the old name kept for users: nothing of ours may import it.
LAYERS = {
    "idefics2_jax.config": 0,
    "idefics2_jax.processing": 1,
    "idefics2_jax.nn": 1,
    "idefics2_jax.ckpt": 2,
    "idefics2_jax.generation": 3,
    "idefics2_jax.finetune": 3,
    "idefics2_jax.quant": 3,
    "idefics2_jax.finetune.command": 5,  # the `finetune` command: CLI level (loads and saves checkpoints)
    "idefics2_jax.loading": 4,
    "idefics2_jax.__main__": 5,
    "idefics2_jax.sharding": 5,
    "idefics2_jax": 6,  # the package's __init__: the public names
    "convert": 5,
}
CLI = {"idefics2_jax.__main__", "convert.__main__"}


def _modules():
    out = {}
    for package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(module: str, path: str):
    """(imported module, inside a function?) for every import of a module of ours."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            # `from .pkg import mod` imports a module; `from .mod import name` imports that module.
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield name, id(node) in in_function


def _layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


GRAPH = {m: sorted({name for name, _ in _imports(m, p)} - {m}) for m, p in MODULES.items()}


def test_the_scan_sees_the_layers():
    assert "idefics2_jax.nn.model" in GRAPH["idefics2_jax.ckpt.shapes"]
    assert "idefics2_jax.nn.partitioning" in GRAPH["idefics2_jax.nn.text"]
    assert "idefics2_jax.ckpt.safetensors" in GRAPH["idefics2_jax.ckpt.convert"]
    assert "idefics2_jax.ckpt.convert" in GRAPH["convert.__main__"]
    assert "idefics2_jax.processing.tokenizer" in GRAPH["idefics2_jax.processing.processor"]


def test_no_cycle():
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in GRAPH.get(m, ()):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_imports_go_one_way():
    bad = [f"{m} imports {n}" for m, names in GRAPH.items() for n in names
           if n in MODULES and _layer(n) > _layer(m)
           and not (m.startswith("idefics2_jax.processing") and n == "idefics2_jax.config")]
    bad += [f"{m} imports {n}" for m, names in GRAPH.items() for n in names
            if m.startswith("idefics2_jax.processing") and not n.startswith("idefics2_jax.processing")]
    bad += [f"{m} imports the old name {n}" for m, names in GRAPH.items() for n in names
            if n == "idefics2_jax.sharding"]
    assert not bad, bad


def test_nn_partitioning_imports_only_jax():
    tree = ast.parse(open(MODULES["idefics2_jax.nn.partitioning"], encoding="utf-8").read())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "contextlib", "contextvars", "math", "typing", "jax", "numpy"}, roots


def test_no_package_import_inside_a_function():
    bad = [f"{m} imports {name} inside a function" for m, p in MODULES.items() for name, inside in _imports(m, p)
           if inside]
    assert not bad, bad


def test_old_names_still_work():
    import idefics2_jax
    from idefics2_jax import sharding
    from idefics2_jax.ckpt import placement
    from idefics2_jax.nn import partitioning

    for name in ("load_model", "generate", "Idefics2Processor", "Idefics2Config", "Idefics2ForConditionalGeneration",
                 "TextStreamer", "GenerationConfig", "Idefics2Tokenizer", "Idefics2ImageProcessor"):
        assert hasattr(idefics2_jax, name), name
    assert callable(idefics2_jax.generate) and idefics2_jax.generate.__module__ == "idefics2_jax.generation.api"
    for name in ("make_mesh", "use_mesh", "use_rules", "DEFAULT_RULES", "VISION_TENSOR_PARALLEL_RULES",
                 "logical_to_spec", "shard_batch", "data_sharding", "constrain"):
        assert getattr(sharding, name) is getattr(partitioning, name), name
    for name in ("param_shardings", "param_specs", "shard_params", "init_cache"):
        assert getattr(sharding, name) is getattr(placement, name), name
