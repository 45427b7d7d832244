"""lm-eval over our suites on the tiny model: scores, exact counts, adapters, gates, the pipeline stage, the CLI."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmstack.config.eval import EvalSpec, GateSpec
from llmstack.config.eval_suites import load_suite
from llmstack.eval.compare import EvalGateError, check_gates
from llmstack.eval.run import Target, evaluate, resolve_folder
from llmstack.eval.task_data import read_task
from llmstack.serve.readiness import wait_ready


@pytest.fixture(scope="module")
def smoke_samples(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke_samples")


@pytest.fixture(scope="module")
def smoke_scores(tiny_model, smoke_samples):
    # float32, as the tiny server's engine: the parity test compares the two
    return evaluate(Target(model=tiny_model, dtype="float32"), "smoke", samples_dir=smoke_samples)


def test_smoke_scores_are_fractions_with_exact_counts(smoke_scores):
    suite = load_suite("smoke")
    assert list(smoke_scores) == [t.name for t in suite.tasks]
    for spec in suite.tasks:
        res = smoke_scores[spec.name]
        assert res["n"] == spec.n, spec.name
        assert 0.0 <= res["score"] <= 1.0, spec.name
        assert res["chat"] == spec.chat
        # every score carries its items and its 95% interval: the items' mean is the score, the interval holds it
        assert len(res["items"]) == res["n"] and sum(res["items"]) / res["n"] == pytest.approx(res["score"])
        lo, hi = res["ci95"]
        assert lo <= res["score"] <= hi and hi - lo > 0.1  # a handful of items: a wide interval
    assert "exact_match,flexible-extract" in smoke_scores["gsm8k"]["all"]


@pytest.fixture(scope="module")
def identity_adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter that teaches the tiny model to answer every identity question with its name.

    A few dozen plain optimizer steps (not TRL: this is a test fixture that only needs *some* adapter that changes
    the answers, in seconds)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)  # before the adapter's random initialisation, so the adapter is the same in every run
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    batch = []
    for doc in read_task("identity"):
        msgs = [{"role": "user", "content": doc["question"]}, {"role": "assistant", "content": "I am llmstack."}]
        batch.append(tok.apply_chat_template(msgs, tokenize=False))
    enc = tok(batch, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(30):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("adapter") / "identity"
    model.save_pretrained(out)
    # peft records the base as the folder it was loaded from; resolve_folder relies on that
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    return out


def test_adapter_changes_identity_score(tiny_model, identity_adapter, smoke_scores):
    base, adapter = resolve_folder(identity_adapter)
    assert (base, adapter) == (Path(tiny_model), identity_adapter)
    tuned = evaluate(Target(model=base, adapter=adapter), "smoke", limit=4, tasks=["identity"])
    assert smoke_scores["identity"]["score"] == 0.0  # a random model does not say "llmstack"
    assert tuned["identity"]["score"] == 1.0
    # the name is a setting: asked for another name, the same answers score nothing
    other = evaluate(Target(model=base, adapter=adapter), "smoke", limit=2, identity_name="zebra", tasks=["identity"])
    assert other["identity"]["score"] == 0.0


def test_scoring_runs_no_environment_survey(tiny_model, monkeypatch):
    """lm-eval would add torch's collect_env report to every call's results, a second of pip, lscpu and gcc
    subprocesses each time; scoring starts no process at all, and torch's function is back after it."""
    import subprocess

    from torch.utils import collect_env

    started = []
    real_init = subprocess.Popen.__init__

    def recording(self, args, *a, **kw):
        started.append(args)
        real_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording)
    before = collect_env.get_pretty_env_info
    scores = evaluate(Target(model=tiny_model, dtype="float32"), "smoke", limit=2, tasks=["identity"])
    assert scores["identity"]["n"] == 2
    assert [a for a in started if "git" not in str(a)] == []  # lm-eval's `git describe` is all (milliseconds)
    assert collect_env.get_pretty_env_info is before


def _scores(**stage_task_score):
    return {stage: {task: {"score": s, "metric": "acc,none", "n": 4} for task, s in tasks.items()}
            for stage, tasks in stage_task_score.items()}


def test_gates_name_stage_task_score_and_threshold():
    scores = _scores(base={"arc_easy": 0.50, "boolq": 0.60}, sft={"arc_easy": 0.30, "boolq": 0.59})
    problems = check_gates(scores, GateSpec(min={"arc_easy": 0.40}, max_regression=0.05))
    assert problems == [
        "sft: arc_easy = 0.3000 is below the gate min.arc_easy = 0.4",
        "sft: arc_easy = 0.3000 dropped 0.2000 from base 0.5000, more than max_regression = 0.05",
    ]
    assert check_gates(scores, GateSpec(min={"boolq": 0.5}, max_regression=0.25)) == []  # a 0.2 drop is allowed
    # with only the base evaluated, `min` judges the base; otherwise only the last stage (the shipped model)
    assert check_gates(_scores(base={"arc_easy": 0.1}), GateSpec(min={"arc_easy": 0.2}))[0].startswith("base:")
    three = _scores(base={"identity": 0.0}, cpt={"identity": 0.0}, sft={"identity": 1.0})
    assert check_gates(three, GateSpec(min={"identity": 0.5})) == []


def test_regression_gates_decide_on_the_paired_interval():
    """With per-item scores a drop fails only when significant; a drop the items cannot establish says so."""
    from llmstack.eval.compare import gate_verdicts

    def stage(items):
        return {"score": sum(items) / len(items), "metric": "acc,none", "n": len(items), "items": items}

    base = [1.0] * 60 + [0.0] * 40
    big = [1.0] * 30 + [0.0] * 70  # 30 of the same 100 items lost: significant
    small = [1.0] * 55 + [0.0] * 45  # 5 lost: more than max_regression 0.02, but not significantly
    gates = GateSpec(max_regression=0.02)
    verdicts = gate_verdicts({"base": {"arc_easy": stage(base)}, "sft": {"arc_easy": stage(big)}}, gates)
    assert [v["verdict"] for v in verdicts] == ["fail"] and "paired on 100 items" in verdicts[0]["message"]
    verdicts = gate_verdicts({"base": {"arc_easy": stage(base)}, "sft": {"arc_easy": stage(small)}}, gates)
    assert [v["verdict"] for v in verdicts] == ["undecided"] and "more items are needed" in verdicts[0]["message"]
    assert check_gates({"base": {"arc_easy": stage(base)}, "sft": {"arc_easy": stage(small)}}, gates) == []
    # a min gate whose interval straddles the threshold passes or fails on the score, and says it is not sure
    one = {"sft": {"identity": {**stage([1.0] * 6 + [0.0] * 4), "ci95": [0.31, 0.83]}}}
    (v,) = gate_verdicts(one, GateSpec(min={"identity": 0.5}))
    assert v["verdict"] == "pass" and "straddles the threshold" in v["message"]


def test_eval_config_rejects_unknown_suite_and_gate_task():
    from llmstack.config.recipe import RecipeError, parse_recipe

    raw = {"name": "t", "model": {"source": "x"}, "eval": {"suite": "smoke", "gates": {"min": {"arc_esay": 0.4}}}}
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, check_trainer=False)
    assert any("gates.min.arc_esay: suite 'smoke' has no task 'arc_esay'" in p for p in err.value.problems)
    raw["eval"] = {"suite": "smokey"}
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, check_trainer=False)
    assert any(p.startswith("eval: no eval suite 'smokey'") for p in err.value.problems)
    raw["eval"] = {"suite": "quick", "tasks": ["mmlu"]}
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, check_trainer=False)
    assert any("eval.tasks: suite 'quick' has no task 'mmlu'" in p or "suite 'quick' has no task 'mmlu'" in p
               for p in err.value.problems)
    with pytest.raises(ValueError, match="fractions"):
        GateSpec(min={"arc_easy": 40})


def _ctx(tmp_path, models, spec):
    from types import SimpleNamespace

    d = tmp_path / "eval"
    d.mkdir(parents=True)
    return SimpleNamespace(dir=d, spec=spec, models=models, model=None, datasets={}, name="eval")


def test_pipeline_stage_compares_stages_and_fails_a_gate(tiny_model, identity_adapter, tmp_path):
    from llmstack.stages.eval import run

    spec = EvalSpec(suite="smoke", stages=["base", "sft"], limit=2, tasks=["arc_easy", "identity"],
                    gates={"min": {"identity": 0.5}})
    result = run(_ctx(tmp_path / "ok", {"base": tiny_model, "sft": identity_adapter}, spec))
    assert result.metrics["sft"]["identity"] == 1.0 and result.metrics["base"]["identity"] == 0.0
    section = (tmp_path / "ok" / "eval" / "section.md").read_text()
    # with their 95% Wilson intervals: 0 of 2 and 2 of 2 items
    assert "| identity | named | 2 | 0.000 [0.00, 0.66] | 1.000 [0.34, 1.00] |" in section
    assert "![eval scores per stage](eval.png)" in section and "all gates passed" in section
    assert (tmp_path / "ok" / "eval" / "eval.png").stat().st_size > 5000

    # the same gate on a stage whose identity answers are wrong fails, naming task, score and threshold,
    # and the scores and the section are still written
    spec = EvalSpec(suite="smoke", stages=["base", "sft"], limit=2, tasks=["arc_easy", "identity"],
                    gates={"min": {"identity": 0.5}})
    with pytest.raises(EvalGateError, match=r"sft: identity = 0.0000 is below the gate min.identity = 0.5"):
        run(_ctx(tmp_path / "bad", {"base": tiny_model, "sft": tiny_model}, spec))
    assert json.loads((tmp_path / "bad" / "eval" / "scores.json").read_text())["sft"]["identity"]["score"] == 0.0
    assert "FAILED sft: identity" in (tmp_path / "bad" / "eval" / "section.md").read_text()


def test_cli_prints_a_table_and_fails_cleanly(tiny_model):
    from llmstack.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--model", f"tiny={tiny_model}", "--suite", "smoke", "--limit", "1",
                                "--tasks", "arc_easy,refusal"])
    assert res.exit_code == 0, res.output
    assert "arc_easy" in res.output and "tiny" in res.output and "refusal" in res.output
    assert "[0.00, 0.79]" in res.output  # 0 of 1 item: every score with its 95% Wilson interval
    res = runner.invoke(app, ["eval", "--model", str(tiny_model), "--suite", "nope"])
    assert res.exit_code == 1 and "no eval suite 'nope'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", "--model", str(tiny_model), "--backend", "server"])
    assert res.exit_code == 1 and "needs base_url" in res.output


def test_quantization_recovery_is_quantized_over_its_source():
    from types import SimpleNamespace

    from llmstack.stages.eval import quantization_recovery

    ctx = SimpleNamespace(recipe=SimpleNamespace(stages=[SimpleNamespace(id="sft", type="sft"),
                                                         SimpleNamespace(id="dpo", type="dpo")]))
    scores = {"base": {"arc_easy": {"score": 0.5}},
              "dpo": {"arc_easy": {"score": 0.4}, "identity": {"score": 0.8}, "refusal": {"score": 0.0}},
              "int4": {"arc_easy": {"score": 0.38}, "identity": {"score": 0.6}, "refusal": {"score": 0.1}}}
    rec = quantization_recovery(ctx, scores)
    assert rec["reference"] == "dpo" and rec["quantized"] == "int4"
    assert rec["per_task"] == {"arc_easy": 0.95, "identity": 0.75}  # refusal: a ratio to 0 says nothing
    assert rec["mean"] == 0.85
    assert rec["paired_difference"] == {}  # no per-item scores: nothing to pair
    assert quantization_recovery(ctx, {"base": {}, "dpo": {}}) is None
    scores["dpo"]["arc_easy"]["items"] = [1.0] * 40 + [0.0] * 60
    scores["int4"]["arc_easy"]["items"] = [1.0] * 38 + [0.0] * 62  # two items lost, on the same 100 items
    mean, lo, hi = quantization_recovery(ctx, scores)["paired_difference"]["arc_easy"]
    assert mean == -0.02 and lo < mean <= hi <= 0


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    """The llmstack server (guarded API, transformers engine) on the tiny model, in a thread of this process."""
    import socket
    import threading

    import uvicorn

    from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
    from llmstack.serve.app import build_app
    from llmstack.serve.engines import HfEngine
    from llmstack.serve.guard import hash_key

    keys = KeyFile.model_validate({"keys": [{"id": "eval", "sha256": hash_key("sk-eval-tiny"), "models": ["*"]}]})
    policy = GuardPolicy.model_validate({"rate_limits": {"requests_per_minute": 10_000},
                                         "caps": {"max_tokens": 256}})
    app = build_app(HfEngine(tiny_model, "tiny"), ServeSpec(engine="hf"), policy, keys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_ready(f"http://127.0.0.1:{port}/health", timeout=30, poll_s=0.1,
                      gone=lambda: not thread.is_alive()) == "ready"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def _loglikelihoods(samples: Path, task: str) -> list[float]:
    return [ll for line in (samples / f"{task}.jsonl").read_text().splitlines()
            for ll, _greedy in json.loads(line)["filtered_resps"]]


def test_scores_through_the_server_equal_in_process(tiny_model, tiny_server, smoke_scores, smoke_samples, tmp_path):
    """Multiple choice (prompt logprobs via echo), raw-text generation and chat generation through the llmstack
    server score what lm-eval `hf` scores in-process: every choice's loglikelihood within 1e-4, the same answers."""
    from llmstack.eval.run import parity

    tasks = ["arc_easy", "winogrande", "gsm8k", "identity"]
    served = evaluate(Target(model=tiny_model, backend="server", base_url=tiny_server, served_name="tiny",
                             api_key="sk-eval-tiny"), "smoke", tasks=tasks, samples_dir=tmp_path)
    assert {t: r["n"] for t, r in served.items()} == {"arc_easy": 8, "winogrande": 4, "gsm8k": 2, "identity": 4}
    assert parity({t: smoke_scores[t] for t in tasks}, served) == []
    for task in ("arc_easy", "winogrande"):
        want, got = _loglikelihoods(smoke_samples, task), _loglikelihoods(tmp_path, task)
        assert len(got) == len(want) > 0 and got == pytest.approx(want, abs=1e-4), task
    for task in ("gsm8k", "identity"):  # greedy: the same text
        resps = [[json.loads(x)["resps"] for x in (d / f"{task}.jsonl").read_text().splitlines()]
                 for d in (smoke_samples, tmp_path)]
        assert resps[0] == resps[1], task


def test_the_server_backend_keeps_its_concurrency_in_flight_and_scores_the_same(tiny_model, tmp_path):
    """A batching server (vLLM) answers requests that arrive together in one batch: the server backend sends
    `concurrency` at once (lm-eval's num_concurrent). An engine that counts the answers it is producing at once sees
    one at a time under concurrency 1 and several under 4; the scores and answers are the same."""
    from transformers import AutoTokenizer

    from llmstack.serve.local import serve_engine
    from llmstack.testing import ScriptedEngine

    class Counting(ScriptedEngine):
        now = peak = 0

        async def generate(self, *args):
            Counting.now += 1
            Counting.peak = max(Counting.peak, Counting.now)
            try:
                async for deltas in super().generate(*args):
                    yield deltas
            finally:
                Counting.now -= 1

    engine = Counting(AutoTokenizer.from_pretrained(str(tiny_model)), "I am llmstack, an assistant.", delay=0.05)
    results = {}
    with serve_engine(engine, "hf") as server:
        for concurrency in (1, 4):
            Counting.peak = 0
            target = Target(model=tiny_model, backend="server", base_url=server.base_url,
                            served_name=server.served_name, api_key=server.api_key, concurrency=concurrency)
            scores = evaluate(target, "smoke", tasks=["identity"], samples_dir=tmp_path / str(concurrency))
            results[concurrency] = (Counting.peak, scores["identity"]["n"], scores["identity"]["items"],
                                    (tmp_path / str(concurrency) / "identity.jsonl").read_text())
    assert results[1][0] == 1 and results[4][0] >= 2
    assert results[1][1:] == results[4][1:] and results[1][1] == 4 and sum(results[1][2]) == 4


def test_server_backend_without_a_model_folder_refuses_scoring(tiny_server):
    target = Target(backend="server", base_url=tiny_server, served_name="tiny", api_key="sk-eval-tiny")
    with pytest.raises(ValueError, match=r"arc_easy score choices by loglikelihood.*--model"):
        evaluate(target, "smoke", tasks=["arc_easy"])
