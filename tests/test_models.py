"""Model sources: the packaged SmolLM2 converts from its GGUF, keeps its chat template and stops at <|im_end|>."""

import json

import pytest

from llmstack.models import ModelSourceError, chat_greedy, eos_ids, resolve


def test_local_folder_resolves(tiny_model):
    assert resolve(str(tiny_model)) == tiny_model


def test_unknown_source_is_clear(tmp_path):
    with pytest.raises(ModelSourceError, match="neither a local folder"):
        resolve("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_tiny_model_generation_config_stops_at_end_of_turn(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_ids(tiny_model)
    assert tok.bos_token is None  # the chat template starts every turn itself: no BOS to double


@pytest.mark.slow
def test_smollm2_fetched_and_verified(smollm2):
    info = json.loads((smollm2 / "llmstack_model.json").read_text())
    assert len(info["gguf_sha256"]) == 64 and info["license"] == "Apache-2.0"
    assert "Paris" in info["checks"]["probe"]["answer"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant: no extra BOS


@pytest.mark.slow
def test_smollm2_generation_stops_at_im_end(smollm2):
    out = chat_greedy(smollm2, "What is the capital of Germany?", max_new_tokens=64)
    assert out["stopped_at_eos"], out
    assert out["tokens"][-1] == 2  # <|im_end|>
    assert "system" not in out["text"] and "user" not in out["text"].lower().split()
