"""GGUF export (llmstack/quant/gguf.py) by llama.cpp's own converter and quantizer, read back by llama.cpp itself:
greedy tokens of an f32 export equal transformers', the metadata carries the chat template and end-of-turn token, a
quantized SmolLM2 still answers through llama.cpp's chat completion, the Ollama Modelfile parses back to what was
meant. Bad input fails before any conversion and leaves nothing behind. With calibration rows, llama.cpp's
llama-imatrix computes an importance matrix that llama-quantize uses for the types it helps."""

from __future__ import annotations

import json
import shutil

import pytest

from llmstack.quant import imatrix
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
def test_unsupported_architecture_and_unknown_tokenizer_are_named(tiny_model, small_random, tmp_path, monkeypatch):
    from llmstack.quant import gguf

    passes = []
    converter = gguf._run_converter
    monkeypatch.setattr(gguf, "_run_converter",
                        lambda *a, **kw: passes.append(kw.get("vocab_only", False)) or converter(*a, **kw))
    # the tiny test model's BPE tokenizer is generated: llama.cpp's converter knows no pre-tokenizer for it. A model
    # this small goes straight to the whole conversion, which says so
    with pytest.raises(GGUFError, match="cannot map the tokenizer"):
        export_gguf(tiny_model, tmp_path / "a", ["q8_0"])
    assert passes == [False]
    # a large one is asked for its tokenizer first, in a vocab-only pass, and refused there for the same reason
    monkeypatch.setattr(gguf, "VOCAB_FIRST_BYTES", 0)
    with pytest.raises(GGUFError, match="cannot map the tokenizer"):
        export_gguf(tiny_model, tmp_path / "c", ["q8_0"])
    assert passes == [False, True]
    monkeypatch.undo()
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
    4-bit GGUF, is for the benchmark's recovery figure, not for this test). Both answer through llama.cpp's chat
    completion with the template the GGUF carries. The answer is checked from its first words on: the model's first
    token is a near-tie ("The" -1.88, "L" -1.96 in 16 bits), which q8_0's rounding tips either way depending on the
    CPU's kernels (on an AVX2-only CPU its chat answer begins "L'Étoile")."""
    import llama_cpp
    from transformers import AutoTokenizer

    record = export_gguf(smollm2, tmp_path / "gguf", ["q8_0", "q4_k_m"], name="smollm2")
    files = {t: tmp_path / "gguf" / f["file"] for t, f in record["files"].items()}
    assert files["q4_k_m"].name == "smollm2-Q4_K_M.gguf"
    assert record["files"]["q4_k_m"]["bytes"] < record["files"]["q8_0"]["bytes"] < 160e6  # 16-bit: 270 MB
    question = [{"role": "user", "content": "What is the capital of France?"}]
    begun = AutoTokenizer.from_pretrained(smollm2).apply_chat_template(question, add_generation_prompt=True,
                                                                       tokenize=False) + "The capital of France is"
    for t, path in files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, seed=0)
        answer = llm.create_chat_completion(question, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
        assert answer.strip(), (t, answer)
        if t == "q8_0":
            rest = llm.create_completion(begun, max_tokens=4, temperature=0)["choices"][0]["text"]
            assert "Paris" in rest, (t, answer, rest)
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


needs_tools = pytest.mark.skipif(bool(imatrix.tools_missing()),
                                 reason="needs llama.cpp's llama-imatrix and llama-quantize: run `make gguf`")


def _chat_rows(path, n=40):
    """Curated-style chat rows, varied enough that every weight's input channels see activations."""
    topics = ["the tides", "bread", "prime numbers", "rivers", "the moon", "chess", "volcanoes", "tea", "bees",
              "glass", "maps", "owls", "rain", "clocks"]
    with path.open("w") as f:
        for i in range(n):
            topic = topics[i % len(topics)]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Question {i}: what should I know about {topic}?"},
                {"role": "assistant", "content": f"{topic.capitalize()} are a fine subject; fact {i * 7 % 13} is that "
                                                 f"{topic} change over {i + 2} seasons and years."}]}) + "\n")
    return path


def test_types_that_require_an_importance_matrix_fail_before_work(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(GGUFError, match=r"quantizes iq1_s only with an importance matrix, and it is turned off"):
        export_gguf(tiny_model, out, ["q8_0", "iq1_s"], imatrix_mode="off")
    monkeypatch.setenv("LLMSTACK_LLAMA_CPP_BIN", str(tmp_path / "not-built"))
    with pytest.raises(GGUFError, match=r"quantizes iq2_xs only .* llama-imatrix and llama-quantize are not built "
                                        r"\(in .*not-built\): run `make gguf`"):
        export_gguf(tiny_model, out, ["iq2_xs"], calibration=_chat_rows(tmp_path / "calib.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl"]


@needs_tools
def test_imatrix_calibration_must_exist_and_be_long_enough(tiny_model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(GGUFError, match=r"iq2_xs: llama.cpp quantizes these only with an importance matrix, computed "
                                        r"on calibration text: give rows \(`--imatrix-data"):
        export_gguf(tiny_model, out, ["iq2_xs"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GGUFError, match=r"empty.jsonl is empty"):
        export_gguf(tiny_model, out, ["q4_k_m"], calibration=tmp_path / "empty.jsonl")
    (tmp_path / "short.txt").write_text("too short to cut into two chunks")
    with pytest.raises(GGUFError, match=r"short.txt is \d+ tokens; llama-imatrix needs at least 64"):
        export_gguf(tiny_model, out, ["q4_k_m"], calibration=tmp_path / "short.txt")
    (tmp_path / "rows.arrow").write_bytes(b"\xff\x00")
    with pytest.raises(GGUFError, match=r"rows.arrow is not a .jsonl or .txt file"):
        export_gguf(tiny_model, out, ["q4_k_m"], calibration=tmp_path / "rows.arrow")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(GGUFError, match=r"bad.jsonl:1: a calibration row needs `messages` or `text`"):
        export_gguf(tiny_model, out, ["q4_k_m"], calibration=tmp_path / "bad.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl", "rows.arrow", "short.txt"]


@needs_llamacpp
@needs_tools
def test_imatrix_is_computed_on_chat_rows_and_quantizes_the_types_it_helps(small_random, tmp_path):
    """`llmstack export gguf --imatrix-data`: llama-imatrix measures the 16-bit file on the chat-rendered rows,
    llama-quantize uses the matrix for q4_k_m and iq4_xs (not for q8_0, which has no use for it), the files carry it
    in their metadata, their weights differ from a plain quantization's, and llama.cpp loads and runs them."""
    import gguf
    import llama_cpp
    from typer.testing import CliRunner

    from llmstack.cli import app

    calib = _chat_rows(tmp_path / "calib.jsonl")
    res = CliRunner().invoke(app, ["export", "gguf", str(small_random), str(tmp_path / "out"), "--type", "q4_k_m",
                                   "--type", "iq4_xs", "--type", "q8_0", "--name", "small", "--imatrix-data",
                                   str(calib)])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / "gguf_export.json").read_text())
    matrix = record["imatrix"]
    assert (tmp_path / "out" / matrix["file"]).is_file() and matrix["file"] == "imatrix/small.imatrix.gguf"
    assert matrix["calibration"] == str(calib) and matrix["chunks"] >= 2
    assert matrix["tokens"] == matrix["chunks"] * matrix["chunk_tokens"] <= matrix["calibration_tokens"]
    assert matrix["tensors"] == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert {t: f["imatrix"] for t, f in record["files"].items()} == {"q4_k_m": True, "iq4_xs": True, "q8_0": False}

    plain = export_gguf(small_random, tmp_path / "plain", ["q4_k_m"], name="small")
    assert plain["imatrix"] is None and plain["files"]["q4_k_m"]["imatrix"] is False

    def weights(path):
        reader = gguf.GGUFReader(path)
        fields = {f.name: f for f in reader.fields.values()}
        return fields, {t.name: bytes(t.data) for t in reader.tensors}

    meta, with_matrix = weights(tmp_path / "out" / "small-Q4_K_M.gguf")
    plain_meta, without = weights(tmp_path / "plain" / "small-Q4_K_M.gguf")
    assert meta["quantize.imatrix.chunks_count"].contents() == matrix["chunks"]
    assert "quantize.imatrix.chunks_count" not in plain_meta
    changed = [n for n in with_matrix if with_matrix[n] != without[n]]
    assert any(".ffn_down." in n for n in changed) and "token_embd.weight" not in changed, changed
    for t in ("q4_k_m", "iq4_xs"):
        llm = llama_cpp.Llama(str(tmp_path / "out" / record["files"][t]["file"]), n_ctx=256, verbose=False, seed=0)
        tokens = llm.tokenize(b"<|im_start|>user\nHi<|im_end|>\n", add_bos=False, special=True)
        got = []
        for tok in llm.generate(tokens, temp=0.0, top_k=1):
            got.append(tok)
            if len(got) == 4:
                break
        assert len(got) == 4


@needs_llamacpp
@needs_tools
def test_quantize_stage_computes_the_matrix_on_its_curated_calibration_rows(small_random, tmp_path):
    """`quantize: {method: rtn, gguf: [q4_k_m]}`: no INT4 calibration file exists, so the stage samples the curated
    rows itself (seeded, chat-rendered) and the GGUF table says the matrix was used and on how many chunks."""
    from types import SimpleNamespace

    from datasets import Dataset, DatasetDict

    from llmstack.config.quant import QuantizeSpec
    from llmstack.quant.export import bytes_16bit
    from llmstack.stages.quantize import _gguf

    rows = [json.loads(line) for line in _chat_rows(tmp_path / "rows.jsonl").read_text().splitlines()]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "curated"))
    stage = tmp_path / "int4"
    stage.mkdir()
    ctx = SimpleNamespace(dir=stage, spec=QuantizeSpec(method="rtn", gguf=["q4_k_m"], calibration_samples=32),
                          datasets={"chat": tmp_path / "curated"},
                          recipe=SimpleNamespace(name="small", seed=0, stages=[SimpleNamespace(type="sft",
                                                                                               dataset="chat")]))
    metrics = {}
    lines = _gguf(ctx, small_random, bytes_16bit(small_random), metrics, None)
    assert len((stage / "calibration.jsonl").read_text().splitlines()) == 32
    matrix = metrics["gguf_imatrix"]
    assert matrix["calibration"] == str(stage / "calibration.jsonl") and matrix["chunks"] >= 2
    assert metrics["gguf"]["q4_k_m"]["imatrix"] is True and metrics["gguf"]["q4_k_m"]["answer"]["tokens"] > 0
    assert (f"q4_k_m with an importance matrix by llama-imatrix on {matrix['chunks']} chunks of "
            f"{matrix['chunk_tokens']} calibration tokens") in lines[0]
