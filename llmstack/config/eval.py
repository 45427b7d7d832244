"""Recipe schema for `eval:` — which suite to run on which stages' models, and the gates that fail a run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmstack.config.base import Strict
from llmstack.config.eval_suites import EvalDataError, load_suite


class GateSpec(Strict):
    min: dict[str, float] = Field(default_factory=dict,
                                  description="task -> lowest acceptable score of the last stage in eval.stages")
    max_regression: float | None = Field(None, ge=0, description="largest allowed drop vs the base model, any task; "
                                         "with per-item scores a drop fails only when significant at `level`")
    level: float = Field(0.95, gt=0.5, lt=1, description="confidence level of the paired interval max_regression uses")

    @model_validator(mode="after")
    def _scores_are_fractions(self):
        for task, value in self.min.items():
            if not 0 <= value <= 1:
                raise ValueError(f"min.{task} = {value}: scores are fractions in [0, 1]")
        return self


def parse_thinking(value: str) -> int | None:
    """`eval.thinking` as the number of thinking tokens it allows: `off` 0, `budget:N` N, `on` None (the task's own
    generation limit). Raises ValueError with the fix for anything else."""
    text = str(value).strip().lower()
    if text in ("on", "off"):
        return None if text == "on" else 0
    head, _, number = text.partition(":")
    if head == "budget" and number.strip().isdigit():
        return int(number)
    raise ValueError(f"'{value}' is not a thinking mode: write on (the template's thinking), off (an empty thinking "
                     "block) or budget:N (at most N thinking tokens, then the block is closed), e.g. budget:256")


PERTURBATIONS = ("typos", "casing", "whitespace", "shuffle", "prefix")  # llmstack/eval/perturb.py


class RobustnessSpec(Strict):
    perturbations: list[Literal["typos", "casing", "whitespace", "shuffle", "prefix"]] = Field(
        default_factory=lambda: list(PERTURBATIONS), min_length=1,
        description="seeded perturbations scored against the clean items (llmstack/eval/perturb.py)")
    seed: int = Field(0, description="the perturbations depend only on (seed, kind, item id)")
    tasks: list[str] | None = Field(None, min_length=1, description="only these tasks (None: all the eval scores)")


class JudgeSpec(Strict):
    base_url: str = Field(..., min_length=1, description="the judge's OpenAI-compatible endpoint, e.g. "
                          "https://api.openai.com/v1 or http://127.0.0.1:8000 (a `llmstack serve`)")
    model: str = Field(..., min_length=1, description="the judge model's name at that endpoint")
    api_key_env: str | None = Field(None, description="environment variable holding the judge's API key "
                                    "(never the key itself in a recipe)")
    prompts: str | None = Field(None, description="JSONL prompt set, one {'prompt': ...} or {'messages': [...]} "
                                "per line (None: the 24 general requests in eval_suites/data/judge_prompts.jsonl)")
    dataset: str | None = Field(None, description="or: a curated `messages` dataset (data.datasets) whose held-out "
                                "validation rows give the prompts (each row's last user turn)")
    limit: int | None = Field(None, gt=0, description="at most this many prompts")
    a: str | None = Field(None, description="the stage judged (None: the last of eval.stages)")
    b: str | None = Field(None, description="the stage it is compared with (None: the first of eval.stages)")
    max_tokens: int = Field(128, gt=0, description="longest answer each stage generates (greedy)")
    judge_max_tokens: int = Field(8, gt=0, description="longest judge reply (it is asked for one word)")


    @model_validator(mode="after")
    def _one_prompt_source(self):
        if self.prompts and self.dataset:
            raise ValueError("give the judge's prompts as a file (prompts) or a curated dataset (dataset), not both")
        return self


class EvalSpec(Strict):
    suite: str = Field("smoke", description="a suite under eval_suites/suites/ (smoke, quick, core)")
    stages: list[str] = Field(default_factory=lambda: ["base"], min_length=1,
                              description="'base', stage names, 'int4', or 'gguf-<type>' for a GGUF the quantize "
                                          "stage wrote (quantize.gguf), scored through llama.cpp")
    limit: int | None = Field(None, gt=0, description="at most this many items per task (None: the suite's own size)")
    tasks: list[str] | None = Field(None, min_length=1, description="only these tasks of the suite (None: all)")
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="lm-eval model type used in the pipeline; auto: the device policy's (vllm on a GPU when "
                            "installed, else hf on the run's device)")
    batch_size: int = Field(8, gt=0, description="lm-eval batch size for the hf backend")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the dtype models are scored in (hf and vllm backends); auto: the device policy's "
        "(bfloat16 on a GPU and on a CPU with AVX512-BF16/AMX, else float32). float32 makes scores comparable "
        "across machines")
    tool_choice: Literal["auto", "required"] = Field(
        "auto", description="the tool_calls task: auto (the model decides whether to call) or required (a call is "
                            "forced, decoded under the tools' JSON Schema)")
    identity_name: str = Field("llmstack", min_length=1,
                               description="the name the `identity` task expects the tuned model to state")
    thinking: str = Field(
        "on", description="generation tasks on a model whose chat template thinks (`<think>`): on (the template's "
        "thinking, capped at the task's max_gen_toks), off (enable_thinking false: an empty block), or budget:N "
        "(thinking capped at N tokens, then closed and answered). Scored on the answer only; a template without "
        "thinking answers the same in every mode")
    thinking_budgets: list[int] | None = Field(
        None, min_length=1, description="also score each stage's generation tasks at these thinking budgets (tokens; "
        "0 is `off`), e.g. [0, 64, 256]: the report's accuracy-vs-budget table and thinking_budget.png")
    gates: GateSpec = Field(default_factory=GateSpec)
    robustness: RobustnessSpec | None = Field(None, description="also score every stage on perturbed items")
    judge: JudgeSpec | None = Field(None, description="pairwise judge of two stages' answers (llmstack/eval/judge.py)")

    @field_validator("thinking")
    @classmethod
    def _thinking_mode(cls, value: str) -> str:
        parse_thinking(value)
        return value.strip().lower()

    @field_validator("thinking_budgets")
    @classmethod
    def _budgets(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(b < 0 for b in value) or len(set(value)) != len(value):
            raise ValueError(f"{value}: thinking budgets are distinct token counts >= 0, e.g. [0, 64, 256]")
        return sorted(value)

    @model_validator(mode="after")
    def _suite_and_gate_tasks_exist(self):

        try:
            suite = load_suite(self.suite)
        except EvalDataError as exc:
            raise ValueError(str(exc)) from None
        tasks = [t.name for t in suite.tasks]
        for task in self.tasks or []:
            if task not in tasks:
                raise ValueError(f"tasks: suite '{self.suite}' has no task '{task}' (tasks: {', '.join(tasks)})")
        for task in (self.robustness.tasks if self.robustness else None) or []:
            if task not in (self.tasks or tasks):
                raise ValueError(f"robustness.tasks: '{task}' is not among the tasks evaluated (tasks: "
                                 f"{', '.join(self.tasks or tasks)})")
        for task in self.gates.min:
            if task not in (self.tasks or tasks):
                raise ValueError(f"gates.min.{task}: suite '{self.suite}' has no task '{task}' (tasks: "
                                 f"{', '.join(tasks)})")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        if self.judge:
            a, b = self.judge.a or self.stages[-1], self.judge.b or self.stages[0]
            for key, stage in (("a", a), ("b", b)):
                if stage not in self.stages:
                    raise ValueError(f"judge.{key}: '{stage}' is not in eval.stages ({', '.join(self.stages)})")
            if a == b:
                raise ValueError(f"judge: compares two stages, but a and b are both '{a}' (list two stages in "
                                 "eval.stages, or set judge.a / judge.b)")
        return self
