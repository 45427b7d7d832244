"""Where things live: the repository's own folders and the per-machine cache. The one place that knows them."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITES_DIR = REPO / "eval_suites"
ACCELERATE_DIR = REPO / "recipes" / "accelerate"


def cache_root() -> Path:
    """Where fetched models and data live: $LLMSTACK_CACHE, else ~/.cache/llmstack."""
    return Path(os.environ.get("LLMSTACK_CACHE", Path.home() / ".cache" / "llmstack"))
