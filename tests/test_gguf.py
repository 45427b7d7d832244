"""GGUF export (llmstack/quant/gguf.py) by llama.cpp's own converter and quantizer, read back by llama.cpp itself:
greedy tokens of an f32 export equal transformers', the metadata carries the chat template and end-of-turn token, a
quantized SmolLM2 still answers through llama.cpp's chat completion, the Ollama Modelfile parses back to what was
meant. Bad input fails before any conversion and leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from llmstack.quant.gguf import GGUFError, converter_dir, export_gguf
from llmstack.quant.ollama import CHATML_TEMPLATE, parse_modelfile

needs_llamacpp = pytest.mark.skipif(not (converter_dir() / "convert_hf_to_gguf.py").is_file(),
                                    reason="needs llama.cpp's converter and llama-cpp-python: run `make gguf`")


def test_bad_input_fails_before_work_and_leaves_nothing(tiny_model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(GGUFError, match="unknown GGUF type q4_k_x: choose from"):
        export_gguf(tiny_model, out, ["q4_k_x"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(GGUFError, match="LoRA adapter only"):
        export_gguf(adapter, out, ["q8_0"])
    with pytest.raises(GGUFError, match="not a folder"):
        export_gguf(tmp_path / "nowhere", out, ["q8_0"])
    (out).mkdir()
    with pytest.raises(GGUFError, match="exists"):
        export_gguf(tiny_model, out, ["q8_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


@needs_llamacpp
def test_unsupported_architecture_and_unknown_tokenizer_are_named(tiny_model, small_random, tmp_path):
    # the tiny test model's BPE tokenizer is generated: llama.cpp's converter knows no pre-tokenizer for it
    with pytest.raises(GGUFError, match="cannot map the tokenizer"):
        export_gguf(tiny_model, tmp_path / "a", ["q8_0"])
    odd = tmp_path / "odd"
    shutil.copytree(small_random, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["MadeUpForCausalLM"]}))
    with pytest.raises(GGUFError, match="does not support the architecture MadeUpForCausalLM"):
        export_gguf(odd, tmp_path / "b", ["q8_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]  # no partial folders


@needs_llamacpp
def test_f32_export_generates_what_transformers_does(small_random, tmp_path):
    import gguf
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = export_gguf(small_random, tmp_path / "out", ["f32", "q8_0"], name="small")
    files = {t: tmp_path / "out" / f["file"] for t, f in record["files"].items()}
    assert sorted(files) == ["f32", "q8_0"] and all(p.is_file() for p in files.values())
    assert record["files"]["q8_0"]["bytes"] < record["files"]["f32"]["bytes"] / 2
    assert json.loads((tmp_path / "out" / "gguf_export.json").read_text()) == record
    tok = AutoTokenizer.from_pretrained(small_random)
    reader = gguf.GGUFReader(files["q8_0"])
    meta = {f.name: f for f in reader.fields.values()}
    assert meta["tokenizer.chat_template"].contents() == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id  # <|im_end|>: the end of a turn
    # the byte-level BPE mapped as what it is (the packaged tokenizer's stray byte_fallback would make it SentencePiece)
    assert (meta["tokenizer.ggml.model"].contents(), meta["tokenizer.ggml.pre"].contents()) == ("gpt2", "smollm")

    text = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(small_random)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(str(files["f32"]), n_ctx=256, verbose=False, seed=0)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt  # llama.cpp tokenizes as HF does
    got = []
    for t in llm.generate(prompt, temp=0.0, top_k=1):
        got.append(t)
        if len(got) == len(want):
            break
    assert got == want


@needs_llamacpp
@pytest.mark.slow
def test_smollm2_exports_answer_through_llama_cpp_and_ollama_modelfile_parses(smollm2, tmp_path):
    """q8_0 keeps SmolLM2's answer; q4_k_m is written and runs (its quality on this 135M model, itself converted from a
    4-bit GGUF, is for the benchmark's recovery figure, not for this test)."""
    import llama_cpp

    record = export_gguf(smollm2, tmp_path / "gguf", ["q8_0", "q4_k_m"], name="smollm2")
    files = {t: tmp_path / "gguf" / f["file"] for t, f in record["files"].items()}
    assert files["q4_k_m"].name == "smollm2-Q4_K_M.gguf"
    assert record["files"]["q4_k_m"]["bytes"] < record["files"]["q8_0"]["bytes"] < 160e6  # 16-bit: 270 MB
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for t, path in files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, seed=0)
        answer = llm.create_chat_completion(question, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
        assert answer.strip() and ("Paris" in answer or t != "q8_0"), (t, answer)
    modelfile = dict(parse_modelfile((tmp_path / "gguf" / "smollm2-Q4_K_M.Modelfile").read_text()))
    assert modelfile["FROM"] == "./smollm2-Q4_K_M.gguf" and modelfile["TEMPLATE"] == CHATML_TEMPLATE
    assert modelfile["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
    assert modelfile["PARAMETER"] == 'stop "<|im_end|>"'
    assert (tmp_path / "gguf" / "tokenizer.json").is_file()  # for engine: llamacpp


def test_modelfile_parser_reads_ollamas_syntax():
    text = ('# a comment\nfrom ./m.gguf\nTEMPLATE """{{ .System }}\nline two\n"""\nSYSTEM """one line"""\n'
            'PARAMETER temperature 0.2\n')
    assert parse_modelfile(text) == [("FROM", "./m.gguf"), ("TEMPLATE", "{{ .System }}\nline two\n"),
                                     ("SYSTEM", "one line"), ("PARAMETER", "temperature 0.2")]
    with pytest.raises(ValueError, match="never ends"):
        parse_modelfile('TEMPLATE """open\n')
