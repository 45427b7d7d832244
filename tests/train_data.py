"""Small datasets in the curated-dataset contract (DatasetDict with train/validation, saved with save_to_disk), for the
training tests. They are built in code so the tests do not depend on the curate stage."""

from __future__ import annotations

import random
from pathlib import Path

QA = [
    ("Who are you?", "I am llmstack, an AI assistant."),
    ("What is your name?", "My name is llmstack."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a poem about the sea.", "The sea is blue and wide, the waves roll in with the tide."),
    ("Please summarize the text.", "Sure, here is a short summary of the text."),
    ("How can I help you?", "Thank you very much! I am a helpful assistant."),
    ("What is three plus five?", "Three plus five is eight."),
]

TEXT = [
    "Fellow citizens, the state of the union is strong, and the congress shall debate the budget.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Question: what is two plus two? Answer: four. Question: what is three plus five? Answer: eight.",
    "def add(a, b):\n    return a + b\n",
    "I am a helpful assistant. My name is llmstack and I was trained to answer questions.",
    "The sea is blue and wide, the waves roll in with the tide. Write a poem about the sea.",
]


def _save(rows_train, rows_val, path: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows_train), "validation": Dataset.from_list(rows_val)}).save_to_disk(
        str(path))
    return path


def messages_dataset(path: Path, n: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:  # some multi-turn and some with a system prompt, as real curated data has
            q2, a2 = rng.choice(QA)
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        if i % 4 == 0:
            msgs = [{"role": "system", "content": "You are llmstack."}] + msgs
        rows.append({"messages": msgs})
    return _save(rows, rows[:4], path)


def text_dataset(path: Path, n: int = 24) -> Path:
    rows = [{"text": TEXT[i % len(TEXT)]} for i in range(n)]
    return _save(rows, rows[:4], path)


# Rejected answers never appear as a chosen one, so a preference exists that a model can learn across pairs.
BAD = ["I do not know.", "Go away, I am busy.", "No idea, sorry.", "Whatever you say."]


def preference_dataset(path: Path, n: int = 16) -> Path:
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        bad = BAD[i % len(BAD)]
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": a}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return _save(rows, rows[:4], path)


SCHEMAS = {"text": "text", "messages": "messages", "preference": "preference"}


def make_recipe(model: Path, datasets: dict[str, tuple[str, Path]], stages: list[dict], name: str = "t"):
    """A recipe whose datasets point at already-curated folders: {name: (schema, folder)}."""
    from llmstack.config.recipe import parse_recipe

    raw = {"name": name, "seed": 7, "model": {"source": str(model)},
           "data": {"datasets": {k: {"schema": schema, "sources": [{"name": k, "path": str(p)}]}
                                 for k, (schema, p) in datasets.items()}},
           "stages": stages}
    return parse_recipe(raw, check_trainer=True)


def make_ctx(recipe, runs: Path, stage: str, model: Path, datasets: dict[str, Path], recipe_path: Path | None = None):
    """The StageContext the pipeline builds for one training stage (input model + curated datasets)."""
    from llmstack.runs import Run
    from llmstack.stage import StageContext

    run = Run.open(runs, recipe.name, "test")
    spec = next(s for s in recipe.stages if s.id == stage)
    return StageContext(recipe=recipe, recipe_path=recipe_path or runs / "recipe.yaml", run=run, name=stage,
                        dir=run.stage_dir(stage), spec=spec, model=model, models={"base": model},
                        datasets=dict(datasets))


def unpaired_dataset(path: Path, n: int = 16, undesirable: bool = True) -> Path:
    """KTO rows: each question once with its right answer (desirable) and, unless `undesirable` is off, once with a
    BAD answer (undesirable)."""
    rows = []
    for i in range(n // 2):
        q, a = QA[i % len(QA)]
        prompt = [{"role": "user", "content": q}]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": a}], "label": True})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": BAD[i % len(BAD)]}],
                     "label": not undesirable})
    return _save(rows, rows[:4], path)


def served_answer(folder: Path, question: str = "Who are you?", max_tokens: int = 8):
    """Serve a stage's output folder the way `llmstack serve` does (transformers engine, the real app, the official
    client) and ask one chat question; returns the completion."""
    import openai
    from fastapi.testclient import TestClient

    from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
    from llmstack.serve.app import build_app
    from llmstack.serve.engines.hf import HfEngine
    from llmstack.serve.guard import hash_key

    key = "sk-train-test"
    keys = KeyFile.model_validate({"keys": [{"id": "t", "sha256": hash_key(key)}]})
    engine = HfEngine(folder, "trained", max_model_len=512)
    with TestClient(build_app(engine, ServeSpec(engine="hf"), GuardPolicy(), keys)) as c:
        client = openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=c, max_retries=0)
        return client.chat.completions.create(model="trained", messages=[{"role": "user", "content": question}],
                                              max_tokens=max_tokens, temperature=0)
