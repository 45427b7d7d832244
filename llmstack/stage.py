"""What every stage gets and gives back. A stage is a plain function `run(ctx: StageContext) -> StageResult`, one
module per kind under `llmstack/stages/`; `llmstack/pipeline.py` builds the context and records the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstack.config.recipe import Recipe
from llmstack.runs import Run


@dataclass
class StageContext:
    recipe: Recipe
    recipe_path: Path
    run: Run
    name: str  # the stage's name in the manifest ('model', 'curate', 'sft', ...)
    dir: Path  # this stage's own output folder
    spec: Any  # the stage's config block (StageSpec, EvalSpec, ...) or None
    model: Path | None  # the current model folder: output of the last stage that produced one
    models: dict[str, Path]  # every model so far by stage name ('base', 'cpt', 'sft', ...)
    datasets: dict[str, Path]  # curated datasets by name


@dataclass
class StageResult:
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model: Path | None = None  # set when this stage produces the next current model
    datasets: dict[str, Path] = field(default_factory=dict)
