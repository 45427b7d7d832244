"""The run report's Release decision on planted scores: gates with intervals and verdicts, INT4 recovery with the n
needed, robustness and bias/safety deltas against base, the judge's win rate."""

from types import SimpleNamespace

from llmstack.config.eval import GateSpec
from llmstack.eval.compare import gate_verdicts
from llmstack.eval.release import overall, section
from llmstack.stages.eval import quantization_recovery


def _res(items, **all_):
    score = sum(items) / len(items)
    return {"score": score, "metric": "acc,none", "n": len(items), "items": items, "ci95": [0.1, 0.9],
            "all": {"acc,none": score, **all_}}


def test_release_section_on_planted_scores():
    base_items = [1.0] * 60 + [0.0] * 40
    scores = {
        "base": {"arc_easy": _res(base_items),
                 "bias": _res([1.0] * 5 + [0.0] * 5, **{"amb_bias_score,none": 0.10, "accuracy_disamb,none": 0.5}),
                 "over_refusal": _res([1.0] * 10, **{"answered,none": 1.0})},
        "dpo": {"arc_easy": _res([1.0] * 30 + [0.0] * 70),  # 30 of the same items lost: a significant drop
                "bias": _res([1.0] * 6 + [0.0] * 4, **{"amb_bias_score,none": 0.25, "accuracy_disamb,none": 0.6}),
                "over_refusal": _res([1.0] * 5 + [0.0] * 5, **{"answered,none": 0.5})},
    }
    verdicts = gate_verdicts(scores, GateSpec(max_regression=0.05))
    rob = {"base": {"arc_easy": {"typos": {"delta": [-0.02, -0.05, 0.0], "consistency": 0.9}}},
           "dpo": {"arc_easy": {"typos": {"delta": [-0.10, -0.2, 0.0], "consistency": 0.7}}}}
    judge = {"a": "dpo", "b": "base", "win_rate": 0.625, "ci95": [0.5, 0.75], "n_prompts": 24,
             "position_consistency": 0.8}
    text = "\n".join(section(scores, verdicts, True, None, rob, judge))
    assert text.startswith("## Release decision\n\n**BLOCKED: a gate failed** (model evaluated last: `dpo`)")
    arc = next(line for line in text.splitlines() if "| dpo | arc_easy |" in line)
    assert arc.startswith("| max_regression 0.05 | dpo | arc_easy | 100 | -0.300 [") and arc.endswith("| FAIL |")
    assert "| bias score, ambiguous contexts (0 = none) | → 0 | 0.100 | 0.250 (+0.150) |" in text
    assert "| over-refusal: benign risky-looking requests answered | higher | 1.000 | 0.500 (-0.500) |" in text
    assert "| dpo | -0.100 | 0.700 | -0.080 | -0.200 |" in text  # robustness vs base
    assert "win rate **0.625** [95% CI 0.50, 0.75] on 24 prompts" in text
    assert overall([], False).startswith("NO GATES") and overall([{"verdict": "undecided"}], True).startswith("UNDEC")


def test_recovery_reports_items_needed():
    ctx = SimpleNamespace(recipe=SimpleNamespace(stages=[SimpleNamespace(id="sft", type="sft")]))
    ref = [1.0] * 60 + [0.0] * 40
    scores = {"sft": {"arc_easy": _res(ref)}, "int4": {"arc_easy": _res([1.0] * 59 + [0.0] * 41)}}
    rec = quantization_recovery(ctx, scores)
    assert rec["items_needed"]["arc_easy"]["n"] == 98 and rec["items_needed"]["arc_easy"]["n_now"] == 100
    text = "\n".join(section(scores, [], False, rec))
    assert "| arc_easy | 98.3% | 100 | 98 (enough) |" in text
