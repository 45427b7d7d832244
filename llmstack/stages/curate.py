"""Pipeline stage `curate`: every dataset under the recipe's `data.datasets`, from sources to a `datasets` folder with
a data card each (llmstack/data/curate.py does the work: sources -> formats -> cleaning and PII -> filters -> dedup ->
decontamination -> mixing and splits, on datatrove's executor); the report gets one line per dataset."""

from __future__ import annotations

from pathlib import Path

from llmstack.data.curate import curate_recipe
from llmstack.data.sources import SourceError
from llmstack.stage import StageContext, StageResult


def answer_locally(model: Path, engine: str, rows: Path, out: Path) -> dict:
    """A local teacher source's requests (a generate input written by data/teacher.py) through `llmstack generate`'s
    offline batch engine, resuming from what `out` already holds. Passed down to the data layer, which may not import
    llmstack.serve itself."""
    from llmstack.serve.batch import GenerateError, GenerateJob, InputError, generate, pick_engine

    try:
        return generate(GenerateJob(model=model, input=rows, out=out, engine=pick_engine(engine)))
    except (GenerateError, InputError) as exc:
        raise SourceError(f"teacher {model}: the batch engine failed: {exc}") from None


def run(ctx: StageContext) -> StageResult:
    cards = curate_recipe(ctx.recipe, ctx.dir, ctx.model, answer_locally=answer_locally)
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
