"""The model card: MODEL_CARD.md in the Hugging Face format, built from what a run folder records.

One document a model is published and audited with: YAML metadata the Hub reads (base model, licence, datasets,
`model-index` eval results with their 95% intervals) and sections for people — intended and out-of-scope use (the
recipe's `card:` block), training data (the data cards), training procedure (the manifest), evaluation (the eval
stage's scores.json and its release decision), known limitations. The report stage writes it into the run folder and
the final model folder; the registry attaches it to every version. It lives beside the registry because both the
report and the registry build it, and it reads only files (manifest, data cards, scores), never the stages' code.

A fact the run did not record is written as "not recorded", never guessed. huggingface_hub's `ModelCard` /
`ModelCardData` / `EvalResult` build the metadata, so the card parses back with `ModelCard.load` the way the Hub
parses it (its `validate` asks the Hub over the network, which llmstack never needs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from llmstack.config.card import CardSpec
from llmstack.config.recipe import Recipe, RecipeError, load_recipe
from llmstack.runs import sha256_file

CARD_FILE = "MODEL_CARD.md"
NOT_RECORDED = "not recorded"


def write_run_card(run_dir: str | Path, recipe: Recipe | None = None) -> Path:
    """Build the card of the run in `run_dir` and write it there and into the folder of the last model the run made,
    so it travels with the weights. `recipe` (default: the one the run recorded, if still unchanged) gives the
    `card:` block and the base model's name. Returns the run folder's copy."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recipe = recipe or recorded_recipe(manifest)
    card = build_model_card(run_dir, recipe)
    path = run_dir / CARD_FILE
    card.save(path)
    final = final_model(manifest)
    # the manifest's paths are relative to where the run ran: write only into a folder that is this run's own
    if final is not None and final.is_dir() and final.resolve().is_relative_to(run_dir.resolve()):
        card.save(final / CARD_FILE)
    return path


def recorded_recipe(manifest: dict[str, Any]) -> Recipe | None:
    """The recipe the run recorded, when it is still there unchanged; else None (the card then says intended use and
    limitations are not recorded rather than take them from a different recipe)."""
    recipe = manifest.get("recipe") or {}
    path = Path(recipe.get("path") or "/nonexistent")
    if not path.is_file() or sha256_file(path) != recipe.get("sha256"):
        return None
    try:
        return load_recipe(path, check_trainer=False)
    except RecipeError:
        return None


def final_model(manifest: dict[str, Any]) -> Path | None:
    """The folder of the last model the run made; None when the run only used the base model, whose folder (a shared
    cache or the user's own) is not the run's to write into."""
    made = [e["result"]["model"] for s, e in manifest.get("stages", {}).items()
            if s != "model" and e.get("status") == "done" and (e.get("result") or {}).get("model")]
    return Path(made[-1]) if made else None


def build_model_card(run_dir: Path, recipe: Recipe | None) -> ModelCard:
    """The card of the run in `run_dir`; without its recipe, what only the recipe says is "not recorded"."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = (recipe.card if recipe else None) or CardSpec()
    stages = manifest.get("stages", {})
    base = _base_model(stages, recipe.model.source if recipe else None)
    data_cards = [json.loads(p.read_text()) for p in sorted((run_dir / "curate" / "cards").glob("*.json"))]
    scores_path = run_dir / "eval" / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else None
    name = recipe.name if recipe else run_dir.parent.name  # runs/<recipe name>/<run id>
    licence = spec.license or base["license"]
    data = ModelCardData(
        model_name=name,
        base_model=base["id"],
        license=licence,
        language=spec.language or None,
        datasets=[s["name"] for c in data_cards for s in c.get("sources", [])] or None,
        tags=["llmstack", *(t for t in _kinds(stages) if t), *spec.tags],
        eval_results=_eval_results(scores) if scores else None,
        # not a Hub field: the licence of each training source, which `datasets` cannot carry
        dataset_licenses={s["name"]: s.get("license") or NOT_RECORDED for c in data_cards
                          for s in c.get("sources", [])} or None,
    )
    body = [f"# {name}", "",
            f"A model tuned by llmstack from `{base['id'] or NOT_RECORDED}` (run `{run_dir.parent.name}/{run_dir.name}`"
            f", recipe sha256 `{(manifest.get('recipe', {}).get('sha256') or NOT_RECORDED)[:16]}`, git "
            f"`{manifest.get('git_sha') or NOT_RECORDED}`). Licence: {licence or NOT_RECORDED}.", "",
            "## Intended use", "", spec.intended_use or _missing("card.intended_use"), "",
            "## Out-of-scope use", "", spec.out_of_scope or _missing("card.out_of_scope"), "",
            *_training_data(data_cards), *_procedure(manifest, stages, recipe.model.dtype if recipe else None),
            *_evaluation(run_dir, stages, scores),
            "## Known limitations", ""]
    body += [f"- {x}" for x in spec.limitations] or ["- " + _missing("card.limitations")]
    if scores:
        n = sorted({r.get("n") for res in scores.values() for r in res.values() if r.get("n")})
        body.append(f"- Evaluated on {', '.join(map(str, n)) or NOT_RECORDED} items per task: the 95% intervals above "
                    "say how much that can tell apart.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _missing(field: str) -> str:
    return f"_{NOT_RECORDED}_ (set `{field}` in the recipe)"


def _base_model(stages: dict[str, Any], given: str | None) -> dict[str, str | None]:
    """The base model's name and licence: the recipe's source when given, and what the model folder says about itself
    (a packaged model's llmstack_model.json, a Hub folder's README metadata)."""
    folder = Path(((stages.get("model") or {}).get("result") or {}).get("model") or "/nonexistent")
    info = json.loads((folder / "llmstack_model.json").read_text()) if (folder / "llmstack_model.json").exists() else {}
    licence = info.get("license")
    if not licence and (folder / "README.md").exists():
        licence = ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data.to_dict().get("license")
    return {"id": given or info.get("name") or (str(folder) if folder.exists() else None), "license": licence}


def _kinds(stages: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(e.get("kind") for s, e in stages.items()
                              if e.get("status") == "done" and e.get("kind") not in ("model", "curate", "report")))


def _eval_results(scores: dict[str, dict[str, Any]]) -> list[EvalResult]:
    """model-index entries for the model evaluated last (the one the release decision is about): each task's score,
    with its 95% interval and item count as the metric's args."""
    shipped = list(scores)[-1]
    out = []
    for task, r in scores[shipped].items():
        if r.get("score") is None:
            continue
        args = {"stage": shipped, "n": r.get("n")}
        if r.get("ci95"):
            args["ci95"] = list(r["ci95"])
        out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                              metric_type=(r.get("metric") or "score").split(",")[0], metric_value=r["score"],
                              metric_args=args))
    return out


def _training_data(cards: list[dict[str, Any]]) -> list[str]:
    lines = ["## Training data", ""]
    if not cards:
        return lines + [f"_{NOT_RECORDED}_ (this run curated no dataset)", ""]
    lines += ["| dataset | schema | source | origin | licence | rows in | rows kept |",
              "|---|---|---|---|---|---:|---:|"]
    for c in cards:
        for s in c.get("sources", []):
            lines.append(f"| {c['name']} | {c.get('schema', '')} | {s['name']} | {s.get('origin') or NOT_RECORDED} | "
                         f"{s.get('license') or NOT_RECORDED} | {s.get('rows_in', '')} | {s.get('rows_kept', '')} |")
    lines += ["", "| dataset | train rows | validation rows | quarantined | content sha256 |",
              "|---|---:|---:|---:|---|"]
    for c in cards:
        n = c.get("counts", {})
        lines.append(f"| {c['name']} | {n.get('train', NOT_RECORDED)} | {n.get('validation', NOT_RECORDED)} | "
                     f"{n.get('dropped', NOT_RECORDED)} | `{(c.get('content_sha256') or NOT_RECORDED)[:16]}` |")
    return lines + ["", "Every dropped row is kept with its reason in the run's `curate/quarantine/`; the full data "
                    "cards are in `curate/cards/`.", ""]


def _procedure(manifest: dict[str, Any], stages: dict[str, Any], dtype: str | None) -> list[str]:
    host = manifest.get("host") or {}
    versions = manifest.get("versions") or {}
    lines = ["## Training procedure", "",
             f"Seed {manifest.get('seed', NOT_RECORDED)}; host `{host.get('platform') or NOT_RECORDED}` with "
             f"{host.get('cpus') or NOT_RECORDED} CPUs; torch `{versions.get('torch') or NOT_RECORDED}`, transformers "
             f"`{versions.get('transformers') or NOT_RECORDED}`, TRL `{versions.get('trl') or NOT_RECORDED}`; the base "
             f"model's `model.dtype`: {dtype or NOT_RECORDED} (`auto`: the device policy's; each stage's precision "
             "is in the table).", "",
             "| stage | kind | status | steps | train loss (first → last) | wall time (s) | processes | device | "
             "precision |", "|---|---|---|---:|---|---:|---:|---|---|"]
    for name, e in stages.items():
        if e.get("kind") == "report":
            continue
        m = e.get("metrics") or {}
        loss = (f"{m['first_loss']:.3f} → {m['last_loss']:.3f}" if m.get("first_loss") is not None
                and m.get("last_loss") is not None else "")
        # a training stage records its device and precision; a quantization stage its own per scheme (metrics["w4a16"])
        quant = next((v for v in m.values() if isinstance(v, dict) and "scheme" in v and "device" in v), {})
        wall = f"{e['wall_s']:.1f}" if e.get("wall_s") is not None else NOT_RECORDED
        device = m.get("device") or quant.get("device") or NOT_RECORDED
        dtype = m.get("dtype") or quant.get("dtype") or NOT_RECORDED
        lines.append(f"| {name} | {e.get('kind', '')} | {e.get('status', NOT_RECORDED)} | {m.get('steps', '')} | "
                     f"{loss} | {wall} | {m.get('world_size', '')} | {device} | {dtype} |")
    total = sum(e.get("wall_s") or 0 for e in stages.values())
    return lines + ["", f"Total wall time of the stages: {total:.1f} s.", ""]


def _evaluation(run_dir: Path, stages: dict[str, Any], scores: dict[str, Any] | None) -> list[str]:
    entry = stages.get("eval")
    if not scores:
        why = "this run has no eval stage" if entry is None else f"eval status: {entry.get('status', 'unknown')}"
        return ["## Evaluation", "", f"_{NOT_RECORDED}_ ({why}).", "", "## Release decision", "",
                f"_{NOT_RECORDED}_ (no evaluation, so no gate decided this release).", ""]
    tasks = list(dict.fromkeys(t for res in scores.values() for t in res))
    lines = ["## Evaluation", "", "Score per model the run made [95% interval] (n items); `base` is the model before "
             "tuning:", "", "| stage | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for stage, res in scores.items():
        cells = []
        for t in tasks:
            r = res.get(t)
            ci = (r or {}).get("ci95")
            cells.append(NOT_RECORDED if not r or r.get("score") is None else
                         f"{r['score']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" (n={r.get('n')})")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    recovery = ((entry or {}).get("metrics") or {}).get("recovery")
    lines += ["", "Quantization recovery: " + (
        f"`{recovery['quantized']}` keeps {recovery['mean']:.1%} of `{recovery['reference']}`'s score on average ("
        + ", ".join(f"{t} {v:.1%}" for t, v in recovery["per_task"].items()) + ")."
        if recovery and recovery.get("mean") is not None else f"{NOT_RECORDED} (no quantized model was evaluated)."),
        ""]
    gguf = ((stages.get("int4") or {}).get("metrics") or {}).get("gguf")
    if gguf:
        sizes = ", ".join(f"{t} {g.get('size_vs_16bit')}" for t, g in gguf.items())
        lines += [f"GGUF exports (size vs 16-bit): {sizes}; their scores: {NOT_RECORDED} (the eval stage does not "
                  "score GGUF files).", ""]
    if not (run_dir / "eval" / "robustness.json").exists():
        lines += [f"Robustness under perturbation: {NOT_RECORDED} (set `eval.robustness` to measure it).", ""]
    # The eval stage's own release decision (gates with intervals, INT4 recovery, robustness and bias/safety vs base),
    # as it wrote it: one rendering of the decision, not a second one here.
    section = (run_dir / "eval" / "section.md")
    decision = section.read_text().split("## Evaluation")[0].strip() if section.exists() else ""
    status = (entry or {}).get("status", "unknown")
    lines += [decision or f"## Release decision\n\n_{NOT_RECORDED}_", "",
              f"Eval stage status: `{status}`" + (f" ({entry['error']})" if entry and entry.get("error") else "") + ".",
              ""]
    return lines
