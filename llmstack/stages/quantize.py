"""Pipeline stage `quantize` (named after its scheme in the manifest: `int4`, `int8`): llm-compressor in its own
environment (llmstack/quant/export.py), then a size comparison, an answer check, and the serving choice (which
engine and dtype can serve the export on this machine) written to serve.json for the serve stage.
"""

from __future__ import annotations

import json
import logging

from llmstack.quant.export import (
    QuantizeError,
    answer_check,
    bytes_16bit,
    compress,
    vllm_kernel_for,
    weights_bytes,
    write_calibration,
)
from llmstack.stage import StageContext, StageResult

log = logging.getLogger("llmstack")


def _calibration_dataset(ctx: StageContext) -> str | None:
    if ctx.spec.calibration_dataset:
        return ctx.spec.calibration_dataset
    sft = [s.dataset for s in ctx.recipe.stages if s.type == "sft"]
    return sft[-1] if sft else next(iter(ctx.datasets), None)


def run(ctx: StageContext) -> StageResult:
    spec, model = ctx.spec, ctx.model
    calib, n_calib = None, 0
    if spec.method != "rtn":
        name = _calibration_dataset(ctx)
        if name is None or name not in ctx.datasets:
            raise QuantizeError(f"method {spec.method} needs calibration data: add a dataset or use method rtn")
        calib = ctx.dir / "calibration.jsonl"
        n_calib = write_calibration(ctx.datasets[name], model, calib, spec.calibration_samples, ctx.recipe.seed)

    exports = {spec.scheme: ctx.dir / spec.scheme}
    can_serve, dtype, why = vllm_kernel_for(spec.scheme)
    serve_scheme = spec.scheme
    if not can_serve and spec.serve_fallback:
        exports[spec.serve_fallback] = ctx.dir / spec.serve_fallback
        serve_scheme = spec.serve_fallback
        _, dtype, fallback_why = vllm_kernel_for(serve_scheme)
        why = f"{why}; serving {serve_scheme} instead: {fallback_why}"
    log.info("serving choice: %s via vLLM, dtype %s (%s)", serve_scheme, dtype, why)

    full16 = bytes_16bit(model)
    rows, metrics = [], {"calibration_samples": n_calib, "bytes_16bit": full16}
    for scheme, out in exports.items():
        method = spec.method if not (scheme == "w8a8" and spec.method == "awq") else "gptq"
        info = compress(model, out, scheme, method, spec.group_size, calib, spec.calibration_samples,
                        spec.max_calibration_length, ctx.recipe.seed)
        size = weights_bytes(out)
        check = answer_check(out)
        metrics[scheme] = {**info, "bytes": size, "size_vs_16bit": round(size / full16, 3), "answer": check}
        rows.append(f"| {scheme} | {method} | {size / 2**20:.1f} MiB | {size / full16:.2f}x | {info['seconds']:.0f} s "
                    f"| {check['text'][:60]!r} |")
    gguf_rows = _gguf(ctx, model, full16, metrics, calib) if spec.gguf else []
    serve = {"model": str(exports[serve_scheme]), "scheme": serve_scheme, "engine": "vllm", "dtype": dtype,
             "reason": why}
    if not can_serve and not spec.serve_fallback:
        serve = {"model": str(exports[spec.scheme]), "scheme": spec.scheme, "engine": "hf", "dtype": "float32",
                 "reason": why + "; serve_fallback is null, so the transformers engine serves INT4"}
    (ctx.dir / "serve.json").write_text(json.dumps(serve, indent=2))
    metrics["serve"] = serve
    (ctx.dir / "section.md").write_text("\n".join([
        f"## Quantization ({ctx.name})", "",
        f"llm-compressor, group size {spec.group_size}, lm_head kept in 16-bit, {n_calib} calibration samples; "
        f"what is not quantized (embedding, norms) and the scales are saved in bfloat16. "
        f"16-bit reference: the same weights at 2 bytes per parameter (bfloat16), {full16 / 2**20:.1f} MiB.", "",
        "| scheme | method | size | vs 16-bit | time | answer to 'What is the capital of France?' |",
        "|---|---|---|---|---|---|", *rows, "", *gguf_rows,
        f"Served: **{serve['scheme']}** with the {serve['engine']} engine, dtype {serve['dtype']} — {serve['reason']}.",
        ""]))
    outputs = {scheme: out for scheme, out in exports.items()}
    if spec.gguf:
        outputs["gguf"] = ctx.dir / "gguf"
    outputs["serve"] = ctx.dir / "serve.json"
    return StageResult(outputs=outputs, metrics=metrics, model=exports[spec.scheme])


def _gguf(ctx: StageContext, model, full16: int, metrics: dict, calib) -> list[str]:
    """`quantize.gguf`: GGUF files by llama.cpp's converter and quantizer (llmstack/quant/gguf.py) in <stage>/gguf,
    each answering the check question through llama.cpp; the report's GGUF table. The importance matrix, for the
    types it helps, is computed on the same calibration rows as the INT4 export (sampled here when `method` is rtn)."""
    from llmstack.config.quant import GGUF_TYPES
    from llmstack.quant.gguf import answer_check as gguf_answer
    from llmstack.quant.gguf import export_gguf

    spec = ctx.spec
    name = _calibration_dataset(ctx)
    if calib is None and spec.gguf_imatrix != "off" and name in ctx.datasets and any(
            GGUF_TYPES[t.lower()].imatrix for t in spec.gguf):
        calib = ctx.dir / "calibration.jsonl"
        write_calibration(ctx.datasets[name], model, calib, spec.calibration_samples, ctx.recipe.seed)
    record = export_gguf(model, ctx.dir / "gguf", spec.gguf, name=ctx.recipe.name, force=True, calibration=calib,
                         imatrix_mode=spec.gguf_imatrix)
    matrix = record["imatrix"]
    metrics["gguf_imatrix"] = matrix
    rows = []
    for t, f in record["files"].items():
        check = gguf_answer(ctx.dir / "gguf" / f["file"])
        metrics.setdefault("gguf", {})[t] = {**f, "size_vs_16bit": round(f["bytes"] / full16, 3), "answer": check}
        rows.append(f"| {t} | {f['bytes'] / 2**20:.1f} MiB | {f['bytes'] / full16:.2f}x | "
                    f"{check['tokens_per_s']} tok/s | {check['text'][:60]!r} |")
    used = [t for t, f in record["files"].items() if f["imatrix"]]
    how = (f"; {', '.join(used)} with an importance matrix by llama-imatrix on {matrix['chunks']} chunks of "
           f"{matrix['chunk_tokens']} calibration tokens" if matrix else "")
    return [f"GGUF by llama.cpp's own converter and quantizer (with an Ollama Modelfile beside each file){how}, "
            "answered through llama.cpp:", "", "| type | size | vs 16-bit | llama.cpp decode | answer |",
            "|---|---|---|---|---|", *rows, ""]
