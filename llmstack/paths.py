"""Where things live: the repository's own folders and the per-machine cache. The one place that knows them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITES_DIR = REPO / "eval_suites"
ACCELERATE_DIR = REPO / "recipes" / "accelerate"


def cache_root() -> Path:
    """Where fetched models and data live: $LLMSTACK_CACHE, else ~/.cache/llmstack."""
    return Path(os.environ.get("LLMSTACK_CACHE", Path.home() / ".cache" / "llmstack"))


def llama_cpp_dir() -> Path:
    """llama.cpp's converter (convert_hf_to_gguf.py, gguf-py), which `make gguf` puts in the environment."""
    return Path(sys.prefix) / "share" / "llama.cpp"


def llama_cpp_bin() -> Path:
    """llama.cpp's llama-imatrix and llama-quantize: $LLMSTACK_LLAMA_CPP_BIN, else where `make gguf` installs them."""
    return Path(os.environ.get("LLMSTACK_LLAMA_CPP_BIN", llama_cpp_dir() / "bin"))


def llama_cpp_tools() -> dict[str, Path]:
    """The two llama.cpp programs GGUF export runs, by name (they may not exist: see llama_cpp_bin)."""
    return {name: llama_cpp_bin() / name for name in ("llama-imatrix", "llama-quantize")}
