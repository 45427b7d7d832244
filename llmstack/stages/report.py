"""Pipeline stage `report`: runs/<recipe>/<run>/report.md, the page a person reads after a run.

It lists every stage with status and wall time, the output hashes, and then each stage's own section: a stage that
has something to show (loss curves, an eval chart, a transcript) writes `section.md` (and its PNGs) into its own
folder, and the report includes it in pipeline order with image links made relative to the run folder. A stage this
run adopted from another run (a sweep trial's curation, runs.adopt_fresh) is marked so, left out of the total, and its
section read from that run's folder. Beside it the
report writes the model card, MODEL_CARD.md (llmstack/registry/card.py), also into the final model's folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmstack.registry.card import write_run_card
from llmstack.stage import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    manifest = ctx.run.manifest
    lines = [f"# Run report: {ctx.recipe.name}", "",
             f"- recipe: `{manifest['recipe']['path']}` (sha256 `{manifest['recipe']['sha256'][:16]}`)",
             f"- git: `{manifest.get('git_sha')}`; seed {manifest.get('seed')}; base model `{ctx.recipe.model.source}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()), "",
             "## Stages", "", "| stage | status | wall time (s) |", "|---|---|---|"]
    total = 0.0
    for name, e in manifest["stages"].items():
        if name == "report":
            continue
        reused = f" (reused from `{Path(e['reused_from']).name}`)" if e.get("reused_from") else ""
        total += 0 if reused else e.get("wall_s", 0) or 0
        lines.append(f"| {name} | {e.get('status', '')}{reused} | {e.get('wall_s', 0):.1f} |")
    lines += [f"| **total** | | **{total:.1f}** |", "",
              "## Outputs", "", "| stage | output | sha256 |", "|---|---|---|"]
    for name, e in manifest["stages"].items():
        for key, o in e.get("outputs", {}).items():
            lines.append(f"| {name} | {key}: `{o['path']}` | `{o['sha256'][:16]}` |")
    for name, e in manifest["stages"].items():
        folder = Path(e.get("reused_from") or ctx.run.dir) / name
        section = folder / "section.md"
        if name != "report" and section.exists():
            text = section.read_text()
            # Images a stage links as `(plot.png)` live in its own folder: point them there from the run folder.
            where = os.path.relpath(folder, ctx.run.dir)
            text = re.sub(r"\]\((?!https?://|/)([^)]+\.(?:png|svg|jpg))\)", rf"]({where}/\1)", text)
            lines += ["", text.strip()]
    report = ctx.run.dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    card = write_run_card(ctx.run.dir, ctx.recipe)
    return StageResult(outputs={"report": report, "model_card": card})
