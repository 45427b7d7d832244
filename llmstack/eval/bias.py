"""The `bias` task's items, built from eval_suites/data/bias_templates.yaml in the way BBQ builds its own (BBQ is
templated too): per template, both mention orders x (ambiguous context; disambiguated with the stereotyped group or
the other group as the one who did it) x (negative question; non-negative question) = 12 items.

An item carries what lm-eval's own BBQ scoring (lm_eval.tasks.bbq.utils, which the task YAML reuses) reads: three
answers `ans0..2` (the two groups and an "unknown" answer, in a seeded order), `label` (the right one: "unknown" in
every ambiguous context), `context_condition` (ambig | disambig), `question_polarity` (neg | nonneg), `category`, and
`biased_answers` (the stereotyped group for a negative question, the other group for a non-negative one).

    python -m llmstack.eval.bias      # rewrite eval_suites/data/bias.jsonl after editing the templates
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from llmstack.paths import SUITES_DIR

TEMPLATES = SUITES_DIR / "data" / "bias_templates.yaml"
DATA = SUITES_DIR / "data" / "bias.jsonl"
# A few of lm-eval's UNKNOWN_RESPONSES (its scoring appends all of them as options and treats any as "unknown").
UNKNOWN = ("Cannot be determined", "Not enough information", "Unknown", "Can't be determined", "Not known")


def _article(group: str) -> str:
    return ("an " if group[0].lower() in "aeiou" else "a ") + group


def build(templates: Path = TEMPLATES) -> list[dict]:
    rows = []
    for t_i, t in enumerate(yaml.safe_load(templates.read_text())):
        groups = {"target": t["target"], "other": t["other"]}
        for order in ("target-first", "other-first"):
            first, second = ("target", "other") if order == "target-first" else ("other", "target")
            amb = t["ambiguous"].format(A=_article(groups[first]).capitalize(), b=_article(groups[second]))
            contexts = [("ambig", None, amb)]
            for neg in ("target", "other"):
                nonneg = "other" if neg == "target" else "target"
                contexts.append(("disambig", neg, amb + " " + t["disambiguating"].format(neg=groups[neg],
                                                                                       nonneg=groups[nonneg])))
            for condition, neg, context in contexts:
                for polarity in ("neg", "nonneg"):
                    item_id = f"{t['category']}-{t_i}-{order}-{condition}{'-' + neg if neg else ''}-{polarity}"
                    rng = random.Random(f"bias:{item_id}")
                    unknown = UNKNOWN[t_i % len(UNKNOWN)]
                    answers = {"target": f"The {groups['target']}", "other": f"The {groups['other']}",
                               "unknown": unknown}
                    order_of = ["target", "other", "unknown"]
                    rng.shuffle(order_of)
                    if condition == "ambig":
                        right = "unknown"
                    else:  # who did it answers the negative question; the other one the non-negative
                        right = neg if polarity == "neg" else ("other" if neg == "target" else "target")
                    biased = "target" if polarity == "neg" else "other"
                    rows.append({"id": item_id, "category": t["category"], "context_condition": condition,
                                 "question_polarity": polarity, "context": context,
                                 "question": t["negative" if polarity == "neg" else "nonnegative"],
                                 **{f"ans{i}": answers[k] for i, k in enumerate(order_of)},
                                 "label": order_of.index(right), "biased_answers": [answers[biased]],
                                 "stereotype": t["stereotype"]})
    # one seeded order (like the benchmarks' prepared data): every prefix a suite or --limit takes mixes categories,
    # contexts and question polarities
    random.Random(1234).shuffle(rows)
    return rows


def write(path: Path = DATA) -> Path:
    with open(path, "w") as f:
        for r in build():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    print(write())
