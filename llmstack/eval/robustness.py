"""The robustness suite: each task of a suite scored on its clean items and on seeded perturbations of the same items
(llmstack/eval/perturb.py), through the same backend as any evaluation (hf, vllm, a live server).

Per task and perturbation it reports the clean and the perturbed score, their paired difference with a 95% bootstrap
interval, and the consistency rate — the share of items that get the same answer on both (the option chosen, the
refuse/answer decision, the extracted number; llmstack.eval.run._item_answers) — with its Wilson interval.
A model can keep its score while changing half its answers; consistency shows that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmstack.config.eval_suites import Suite, load_suite
from llmstack.eval.perturb import KINDS, TEXT_FIELDS
from llmstack.eval.run import Target, evaluate
from llmstack.eval.stats import paired_bootstrap, wilson
from llmstack.eval.task_data import read_task

log = logging.getLogger("llmstack")


def _applies(task: str, kind: str) -> bool:
    doc = read_task(task)[0]
    if kind == "shuffle":
        return isinstance(doc.get("choices"), list) and "gold" in doc
    return any(isinstance(doc.get(f), str) for f in TEXT_FIELDS)


def compare(clean: dict[str, Any], perturbed: dict[str, Any]) -> dict[str, Any]:
    """One task's clean vs perturbed result (both from `evaluate` on the same items)."""
    a, b = clean["items"], perturbed["items"]
    out: dict[str, Any] = {"n": len(a), "clean": clean["score"], "perturbed": perturbed["score"],
                           "perturbed_ci95": perturbed.get("ci95")}
    if a and len(a) == len(b):
        mean, lo, hi = paired_bootstrap(a, b)
        out["delta"] = [round(mean, 4), round(lo, 4), round(hi, 4)]
    ca, cb = clean.get("answers") or [], perturbed.get("answers") or []
    if ca and len(ca) == len(cb):
        same = sum(x == y for x, y in zip(ca, cb))
        out["consistency"] = round(same / len(ca), 4)
        out["consistency_ci95"] = [round(x, 4) for x in wilson(same, len(ca))]
    return out


def robustness(target: Target, suite: str | Suite, kinds: list[str] | tuple[str, ...] = KINDS, seed: int = 0,
               limit: int | None = None, tasks: list[str] | None = None, identity_name: str = "llmstack",
               clean: dict[str, Any] | None = None, samples_dir: Path | None = None) -> dict[str, Any]:
    """{task: {kind: compare(...)}} for every task a perturbation applies to. `clean`: this target's scores on the
    same suite/limit/tasks, when already computed (the pipeline's eval stage has them)."""
    suite = load_suite(suite) if isinstance(suite, str) else suite
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown perturbation(s) {', '.join(bad)} (choose from {', '.join(KINDS)})")
    names = [t.name for t in suite.tasks if tasks is None or t.name in tasks]
    if clean is None:
        clean = evaluate(target, suite, limit=limit, identity_name=identity_name, tasks=names)
    result: dict[str, Any] = {}
    for kind in kinds:
        wanted = [t for t in names if _applies(t, kind)]
        if not wanted:
            continue
        log.info("robustness: %s on %s", kind, ", ".join(wanted))
        perturbed = evaluate(target, suite, limit=limit, identity_name=identity_name, tasks=wanted, perturb=kind,
                             perturb_seed=seed, samples_dir=samples_dir / kind if samples_dir else None)
        for task in wanted:
            result.setdefault(task, {})[kind] = compare(clean[task], perturbed[task])
    return result


def markdown_table(rob: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| task | perturbation | n | clean | perturbed | change [95% CI] | consistency [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for task, kinds in rob.items():
        for kind, r in kinds.items():
            d, c, ci = r.get("delta"), r.get("consistency"), r.get("consistency_ci95")
            lines.append(f"| {task} | {kind} | {r['n']} | {r['clean']:.3f} | {r['perturbed']:.3f} | "
                         + (f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "n/a") + " | "
                         + (f"{c:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if c is not None else "n/a") + " |")
    return lines
