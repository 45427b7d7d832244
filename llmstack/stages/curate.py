"""Pipeline stage `curate`: every dataset under the recipe's `data.datasets`, from sources to a `datasets` folder with
a data card each (llmstack/data/curate.py does the work: sources -> formats -> cleaning and PII -> filters -> dedup ->
decontamination -> mixing and splits, on datatrove's executor); the report gets one line per dataset."""

from __future__ import annotations

from llmstack.data.curate import curate_recipe
from llmstack.stage import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    cards = curate_recipe(ctx.recipe, ctx.dir, ctx.model)
    section = ["## Data", ""]
    for name, card in cards.items():
        section.append(f"- **{name}** ({card['schema']}): {card['counts']['rows_in']} rows in, "
                       f"{card['counts']['train']} train / {card['counts']['validation']} validation, "
                       f"{card['counts']['dropped']} quarantined — card: cards/{name}.md")
    (ctx.dir / "section.md").write_text("\n".join(section) + "\n")
    return StageResult(
        outputs={**{name: ctx.dir / name for name in cards}, **{f"{name}.card": ctx.dir / "cards" / f"{name}.json"
                                                               for name in cards}},
        metrics={name: card["counts"] for name, card in cards.items()},
        datasets={name: ctx.dir / name for name in cards},
    )
