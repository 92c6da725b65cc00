"""Shared fixtures: an offline environment and the tiny model built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("posttrain-cache")
    os.environ["POSTTRAIN_CACHE"] = str(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_path(tiny_cache) -> str:
    from posttrain.models.tiny import build_tiny

    return str(build_tiny("arithmetic", seed=0))


@pytest.fixture()
def tiny(tiny_path):
    """A fresh (model, tokenizer) pair of the tiny arithmetic model, float32 on CPU."""
    from posttrain.models.load import load_policy

    return load_policy(tiny_path, "float32", "cpu")
