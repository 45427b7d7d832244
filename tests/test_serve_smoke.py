"""The pipeline's serve stage: serve a model with `llmstack serve` in a subprocess, ask it the recipe's question
through the openai client, write the transcript. The transformers engine keeps this fast; the vLLM path is the
same server code, exercised in test_serve_vllm.py."""

from __future__ import annotations

import json

import pytest

from llmstack.config.recipe import parse_recipe
from llmstack.stage import StageContext
from llmstack.stages.serve import choose_engine, run


@pytest.mark.slow
def test_serve_stage_asks_the_final_model_through_the_api(tiny_model, tmp_path):
    recipe = parse_recipe({"name": "smoke-test", "model": {"source": str(tiny_model)},
                           "serve": {"engine": "hf", "smoke_max_tokens": 8}}, check_trainer=False)
    ctx = StageContext(recipe=recipe, recipe_path=tmp_path / "r.yaml", run=None, name="serve", dir=tmp_path,
                       spec=recipe.serve, model=tiny_model, models={"base": tiny_model}, datasets={})
    result = run(ctx)
    m = result.metrics
    assert m["engine"] == "hf" and m["question"] == "Who are you?" and m["completion_tokens"] == 8
    assert m["answer"] and m["stream_matches"] and m["no_key_status"] == 401
    section = (tmp_path / "section.md").read_text()
    assert "**user:** Who are you?" in section and m["answer"] in section
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [a["status"] for a in audit if a.get("key_id") == "smoke"] == [200, 200]
    keyfile = (tmp_path / "keys.yaml").read_text()
    assert "sk-llmstack-" not in keyfile  # only the hash of the one-off key is on disk


def test_engine_choice_for_quantized_models(tmp_path, monkeypatch):
    def quant(bits):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
            "quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"num_bits": bits}}}}}))

    quant(4)  # INT4 on a CPU: vLLM with bfloat16 activations (the kernel has no float32 path), as measured
    monkeypatch.setattr("llmstack.quant.export.vllm_kernel_for", lambda s: (True, "bfloat16", "cpu kernel"))
    assert choose_engine("vllm", tmp_path) == ("vllm", "bfloat16", "cpu kernel")
    monkeypatch.setattr("llmstack.quant.export.vllm_kernel_for", lambda s: (False, "", "no kernel"))
    assert choose_engine("vllm", tmp_path) == ("hf", None, "no kernel")  # where none exists: transformers
    quant(8)  # W8A8: the dtype its kernel takes, named explicitly (the server's default can be bfloat16)
    monkeypatch.setattr("llmstack.quant.export.vllm_kernel_for", lambda s: (True, "float32", f"{s} cpu kernel"))
    assert choose_engine("vllm", tmp_path) == ("vllm", "float32", "w8a8 cpu kernel")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert choose_engine("vllm", tmp_path) == ("vllm", None, None)  # 16-bit: the server's own dtype
    assert choose_engine("hf", tmp_path) == ("hf", None, None)
