"""An importance matrix for GGUF quantization, by llama.cpp's own `llama-imatrix` and `llama-quantize`.

llama.cpp's k-quant and IQ quantizers weight each weight's rounding error by how strongly the model's activations use
its input channel; `llama-imatrix` measures that (the mean squared activation per channel) by running the 16-bit GGUF
over calibration text. The bindings cannot do either step: computing the matrix is the tool's own code (not in
libllama), so both steps run the two programs that `make gguf` builds from the same vendored llama.cpp as the
bindings (llmstack.paths.llama_cpp_bin).

The calibration text is the rows the INT4 export calibrates on (llmstack/quant/export.py: curated chat rows rendered
with the model's chat template), one after another in one file, with the chat's special tokens parsed as tokens.
llama.cpp cuts it into chunks of `n_ctx` tokens and needs at least two.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

from llmstack.config.quant import GGUF_TYPES, imatrix_tools_problem
from llmstack.paths import llama_cpp_tools

log = logging.getLogger("llmstack")

# llama.cpp's own default context for llama-imatrix; shorter only for calibration text too short for two such chunks
CHUNK_TOKENS = 512
MIN_CHUNK_TOKENS = 32
# bounds the run: 128 chunks of 512 tokens is what llama.cpp's docs suggest is plenty for an importance matrix
MAX_CHUNKS = 128


class ImatrixError(Exception):
    """An importance matrix that cannot be computed or used, with what to do about it."""


def tools_missing() -> list[str]:
    return [name for name, path in llama_cpp_tools().items() if not path.is_file()]


def plan(types: list[str], mode: str, have_calibration: bool) -> dict[str, bool]:
    """For each type: quantize it with an importance matrix? Raises ImatrixError for a type that requires one and
    cannot have it (the tools not built, no calibration rows, or `mode` off)."""
    required = [t for t in types if GGUF_TYPES[t].imatrix == "required"]
    if required and mode == "off":
        raise ImatrixError(f"llama.cpp quantizes {', '.join(required)} only with an importance matrix, and it is "
                           "turned off (gguf_imatrix: off): turn it on or choose another type (iq4_xs, q4_k_m, ...)")
    problem = imatrix_tools_problem(types)
    if problem:
        raise ImatrixError(problem)
    if required and not have_calibration:
        raise ImatrixError(f"{', '.join(required)}: llama.cpp quantizes these only with an importance matrix, computed "
                           "on calibration text: give rows (`--imatrix-data FILE.jsonl|txt`, or a dataset in the "
                           "recipe)")
    usable = mode != "off" and not tools_missing() and have_calibration
    if have_calibration and mode != "off" and not usable:
        log.warning("GGUF without an importance matrix: llama.cpp's %s not built (run `make gguf`)",
                    " and ".join(tools_missing()))
    return {t: usable and GGUF_TYPES[t].imatrix is not None for t in types}


def calibration_text(source: Path, tokenizer_dir: Path, out: Path) -> int:
    """Write `source` (a .txt as it is, or a .jsonl of `messages` / `text` rows, chat-rendered with the model's
    template) as the text llama-imatrix reads; returns its length in the model's tokens."""
    from transformers import AutoTokenizer

    from llmstack.quant.export import QuantizeError, render_jsonl

    if not source.is_file() or source.suffix not in (".jsonl", ".txt"):
        raise ImatrixError(f"calibration file {source} is not a .jsonl or .txt file: give rows with `messages` or "
                           "`text` (.jsonl) or plain text (.txt)")
    if source.suffix == ".jsonl":
        with tempfile.TemporaryDirectory(prefix="llmstack-imatrix-") as tmp:
            rendered = Path(tmp) / "rendered.jsonl"
            try:
                render_jsonl(source, tokenizer_dir, rendered)
            except QuantizeError as exc:
                raise ImatrixError(str(exc)) from None
            texts = [json.loads(line)["text"] for line in rendered.read_text().splitlines() if line.strip()]
        text = "\n".join(texts)
    else:
        try:
            text = source.read_text()
        except UnicodeDecodeError:
            raise ImatrixError(f"calibration file {source} is not UTF-8 text") from None
    if not text.strip():
        raise ImatrixError(f"calibration file {source} is empty: give rows with `messages` or `text` (.jsonl) or "
                           "plain text (.txt)")
    out.write_text(text)
    return len(AutoTokenizer.from_pretrained(tokenizer_dir)(text, add_special_tokens=False)["input_ids"])


def chunk_tokens(n_tokens: int, source: Path) -> int:
    """The chunk length: llama.cpp's 512, or the longest power of two that still gives the two chunks it needs."""
    size = CHUNK_TOKENS
    while size > MIN_CHUNK_TOKENS and n_tokens < 2 * size:
        size //= 2
    if n_tokens < 2 * size:
        raise ImatrixError(f"calibration text {source} is {n_tokens} tokens; llama-imatrix needs at least "
                           f"{2 * MIN_CHUNK_TOKENS}: give more rows")
    return size


def compute(model: Path, text: Path, n_tokens: int, out: Path, threads: int, label: Path) -> dict:
    """Run llama-imatrix on the 16-bit GGUF `model` over `text`; returns what it measured on (chunks, tokens)."""
    ctx = chunk_tokens(n_tokens, label)
    cmd = [str(llama_cpp_tools()["llama-imatrix"]), "-m", str(model), "-f", str(text), "-o", str(out),
           "--output-format", "gguf", "--parse-special", "--no-ppl", "-c", str(ctx), "--chunks", str(MAX_CHUNKS)]
    if threads:
        cmd += ["-t", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-8:])
        raise ImatrixError(f"llama-imatrix failed on {model.name}:\n{tail}")
    return {**read(out), "seconds": round(time.perf_counter() - t0, 1)}


def read(path: Path) -> dict:
    """What an imatrix GGUF says it was computed on: chunks of how many tokens, and the tensors it covers."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    chunks, size = fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()
    return {"chunks": chunks, "chunk_tokens": size, "tokens": chunks * size,
            "tensors": sum(1 for t in reader.tensors if t.name.endswith(".in_sum2"))}


def quantize(src: Path, dst: Path, type_name: str, imatrix: Path, threads: int) -> None:
    """`llama-quantize --imatrix` (the bindings' llama_model_quantize takes no matrix we could compute)."""
    cmd = [str(llama_cpp_tools()["llama-quantize"]), "--imatrix", str(imatrix), str(src), str(dst), type_name.upper()]
    if threads:
        cmd.append(str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-8:])
        raise ImatrixError(f"llama-quantize could not quantize {src.name} to {type_name} with the importance "
                           f"matrix:\n{tail}")
