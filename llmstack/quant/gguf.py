"""GGUF export with llama.cpp's own tools, for llama.cpp, Ollama and LM Studio.

Two steps, both llama.cpp's code (no GGUF writer of ours):
1. `convert_hf_to_gguf.py`, vendored in the llama-cpp-python sdist, turns the HF folder into a 16-bit GGUF (`f16`),
   with the chat template, bos/eos/pad ids and the tokenizer in the metadata. The Makefile puts the converter (and
   the gguf-py beside it) under `<env>/share/llama.cpp/` when it builds llama-cpp-python; it runs in this
   environment's Python (torch, transformers, gguf).
2. `llama_model_quantize` (libllama, through llama-cpp-python's bindings) quantizes that file to each asked type;
   for the types an importance matrix helps, given calibration rows and the llama.cpp tools `make gguf` builds,
   `llama-imatrix` computes one on the 16-bit file and `llama-quantize --imatrix` quantizes with it (imatrix.py).

Every cause we can see before minutes of work is a `GGUFError` first: an unknown type name, a folder with an adapter
only, a model llama.cpp's converter has no class for or whose tokenizer it cannot map (a `--vocab-only` pass of the
converter finds both in seconds). Files are written under `<out>.partial-<pid>/` and the folder is renamed to `out` at
the end, so a failed or killed export never leaves a folder that looks done.

Beside each GGUF an Ollama Modelfile (ollama.py) and, for the folder, `gguf_export.json`: source, types, sizes,
sha256s, the llama.cpp build, and the importance matrix (kept in `imatrix/`) with what it was computed on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmstack.config.quant import GGUF_TYPES as TYPES
from llmstack.paths import llama_cpp_dir
from llmstack.quant import imatrix

CONVERTER_TYPES = ("f32", "f16", "bf16")
# Copied beside the GGUF files: the HF tokenizer and generation settings, which `engine: llamacpp` renders chat
# templates and stops with (the API renders prompts itself, for every engine alike).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


class GGUFError(Exception):
    """A GGUF export that cannot be done, with what to do about it."""


def converter_dir() -> Path:
    """Where the Makefile put llama.cpp's converter for this environment."""
    return llama_cpp_dir()


def check_types(types: list[str]) -> list[str]:
    names = [t.lower() for t in types]
    bad = [t for t in names if t not in TYPES]
    if bad or not names:
        raise GGUFError(f"unknown GGUF type {', '.join(bad) or '(none given)'}: choose from {', '.join(TYPES)}")
    return list(dict.fromkeys(names))


def check_source(model: Path) -> dict:
    """The model folder's config.json, or a GGUFError that says why this folder cannot be converted."""
    if not model.is_dir():
        raise GGUFError(f"{model} is not a folder (give an HF model folder: a stage's output or a packaged model)")
    if (model / "adapter_config.json").is_file() and not (model / "config.json").is_file():
        raise GGUFError(f"{model} holds a LoRA adapter only: llama.cpp converts whole models. Train the stage with "
                        "`lora.merge: true` (its output is then the merged model) and export that")
    if not (model / "config.json").is_file():
        raise GGUFError(f"{model} has no config.json: not an HF model folder")
    if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
        raise GGUFError(f"{model} has no weights (*.safetensors or *.bin)")
    return json.loads((model / "config.json").read_text())


# llama.cpp's converter converts every tensor before it reads the tokenizer, so a tokenizer it cannot map fails only
# after the weights are done: minutes for a large model. There a vocab-only pass (seconds of work) says so first.
# Below this size the whole conversion fails about as soon, and the extra pass would only cost its start-up (the
# converter imports torch and transformers, several seconds).
VOCAB_FIRST_BYTES = 2 * 2**30


def _weight_bytes(model: Path) -> int:
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in model.glob(pattern))


def _run_converter(model: Path, outfile: Path, outtype: str, vocab_only: bool = False, label: Path | None = None
                   ) -> None:
    """llama.cpp's converter on `model` (`label`: the folder to name in errors, when `model` is a staged copy)."""
    label = label or model
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise GGUFError(f"llama.cpp's converter is not installed ({script} is missing): run `make gguf` (`make test` "
                        "runs it too), which builds llama-cpp-python and puts its converter in the environment")
    cmd = [sys.executable, str(script), str(model), "--outfile", str(outfile), "--outtype", outtype]
    if vocab_only:
        cmd.append("--vocab-only")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode == 0:
        return
    log = proc.stderr + proc.stdout
    if "is not supported" in log or "not supported!" in log:
        arch = ", ".join(json.loads((model / "config.json").read_text()).get("architectures") or ["?"])
        raise GGUFError(f"llama.cpp's converter does not support the architecture {arch} of {label}")
    if "pre-tokenizer" in log or "BPE pre-tokenizer was not recognized" in log:
        raise GGUFError(f"llama.cpp's converter cannot map the tokenizer of {label} (its BPE pre-tokenizer is not one "
                        "llama.cpp knows); a model llama.cpp supports keeps its original tokenizer files")
    tail = "\n".join(log.strip().splitlines()[-8:])
    raise GGUFError(f"llama.cpp's converter failed on {label}:\n{tail}")


def _byte_level(tokenizer: dict) -> bool:
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts if isinstance(p, dict))


def _as_llama_cpp_reads_it(model: Path, scratch: Path) -> Path:
    """`model`, or a copy of it (weights linked) whose tokenizer.json llama.cpp's converter reads as what it is.

    A byte-level BPE tokenizer (GPT-2 style: every byte is in its alphabet) that also says `byte_fallback: true` —
    what transformers writes when it rebuilds a tokenizer from a GGUF, as for the packaged SmolLM2 — is taken by the
    converter for a SentencePiece-style Llama vocabulary, and llama.cpp then aborts loading the file. Byte fallback
    never fires on a byte-level alphabet, so the copy drops it and the converter maps the tokenizer as the BPE it is
    (for SmolLM2: `gpt2` with its `smollm` pre-tokenizer)."""
    path = model / "tokenizer.json"
    if not path.is_file():
        return model
    tokenizer = json.loads(path.read_text())
    bpe = tokenizer.get("model") or {}
    if not (bpe.get("type") == "BPE" and bpe.get("byte_fallback") and _byte_level(tokenizer)):
        return model
    staged = scratch / model.name
    staged.mkdir(parents=True)
    for f in model.iterdir():
        if f.name != "tokenizer.json":
            (staged / f.name).symlink_to(f.resolve())
    bpe["byte_fallback"] = False
    (staged / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return staged


def _quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    try:
        import llama_cpp
    except ImportError as exc:
        raise GGUFError("llama-cpp-python is not installed: run `make gguf`") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise GGUFError(f"llama.cpp could not quantize {src.name} to {dst.name} (llama_model_quantize returned {rc})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_gguf(model: Path, out: Path, types: list[str], name: str | None = None, threads: int = 0,
                force: bool = False, calibration: Path | None = None, imatrix_mode: str = "auto") -> dict:
    """Convert `model` (HF folder) to GGUF files of `types` in the folder `out`, each with an Ollama Modelfile;
    returns the export record (also written as out/gguf_export.json). `calibration` (.jsonl rows or .txt) is what an
    importance matrix is computed on, for the types it helps unless `imatrix_mode` is "off"."""
    from llmstack.quant.ollama import write_modelfile

    types = check_types(types)
    config = check_source(model)
    if out.exists() and not force:
        raise GGUFError(f"{out} exists: choose another folder or pass --force to replace it")
    try:
        use_imatrix = imatrix.plan(types, imatrix_mode, calibration is not None)
    except imatrix.ImatrixError as exc:
        raise GGUFError(str(exc)) from None
    name = name or model.name
    work = out.parent / f"{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix="llmstack-gguf-")
    try:
        source = _as_llama_cpp_reads_it(model, Path(scratch.name))
        calib_text, calib_tokens = Path(scratch.name) / "calibration.txt", 0
        if any(use_imatrix.values()):  # an empty or too short calibration file is said before the conversion
            calib_tokens = _imatrix_step(imatrix.calibration_text, calibration, model, calib_text)
            _imatrix_step(imatrix.chunk_tokens, calib_tokens, calibration)
        if _weight_bytes(model) >= VOCAB_FIRST_BYTES:  # architecture and tokenizer first (see VOCAB_FIRST_BYTES)
            _run_converter(source, work / "vocab.gguf", "f16", vocab_only=True, label=model)
            (work / "vocab.gguf").unlink()
        base_type = next((t for t in types if t in CONVERTER_TYPES), "f16")
        base = work / f"{name}-{base_type.upper()}.gguf"
        _run_converter(source, base, base_type, label=model)
        files = {base_type: base}
        # in a folder of its own: a folder holding one model's .gguf is served as that file (engine: llamacpp)
        matrix, measured = work / "imatrix" / f"{name}.imatrix.gguf", None
        if any(use_imatrix.values()):
            matrix.parent.mkdir()
            measured = _imatrix_step(imatrix.compute, base, calib_text, calib_tokens, matrix, threads, calibration)
        for t in types:
            if t not in files:
                files[t] = work / f"{name}-{t.upper()}.gguf"
                if use_imatrix[t]:
                    _imatrix_step(imatrix.quantize, base, files[t], t, matrix, threads)
                else:
                    _quantize(base, files[t], TYPES[t].ftype, threads)
        if base_type not in types:
            base.unlink()
            del files[base_type]
        record = {"source": str(model), "architecture": (config.get("architectures") or [None])[0],
                  "types": types, "files": {}, "seconds": round(time.perf_counter() - t0, 1),
                  "llama_cpp_python": _llama_cpp_version(),
                  "imatrix": measured and {"file": f"imatrix/{matrix.name}", "calibration": str(calibration),
                                           "calibration_tokens": calib_tokens, **measured}}
        for t, path in files.items():
            modelfile = write_modelfile(path, model)
            record["files"][t] = {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                                  "modelfile": modelfile.name, "imatrix": use_imatrix[t]}
        record["tokenizer_files"] = [f for f in TOKENIZER_FILES if (model / f).is_file()]
        for f in record["tokenizer_files"]:
            shutil.copyfile(model / f, work / f)
        (work / "gguf_export.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        scratch.cleanup()
    return record


def _imatrix_step(step, *args):
    try:
        return step(*args)
    except imatrix.ImatrixError as exc:
        raise GGUFError(str(exc)) from None


def _llama_cpp_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - only a label in the record
        return None


def answer_check(path: Path, question: str = "What is the capital of France?", max_tokens: int = 48) -> dict:
    """The file's greedy answer to `question` through llama.cpp itself (its chat completion renders the GGUF's own
    chat template), with llama.cpp's decode speed."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, seed=0)
    t0 = time.perf_counter()
    out = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0)
    seconds = time.perf_counter() - t0
    tokens = out["usage"]["completion_tokens"]
    return {"question": question, "text": out["choices"][0]["message"]["content"], "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None}
