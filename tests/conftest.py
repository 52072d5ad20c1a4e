"""Shared fixtures: tiny random-weight transformers checkpoints written with `save_pretrained`."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import reference  # noqa: E402


@pytest.fixture(scope="session")
def tiny_torch():
    """The reference model (eager attention) with O(1) random weights."""
    return reference.build_torch_model(reference.tiny_config_dict(), seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny_torch, tmp_path_factory):
    """A single-file fp32 HF checkpoint directory of `tiny_torch`."""
    return str(reference.save(tiny_torch, tmp_path_factory.mktemp("tiny_fp32")))


@pytest.fixture(scope="session")
def tiny_jax(tiny_dir):
    import idefics2_jax

    return idefics2_jax.load_model(tiny_dir)
