"""Quantization: llm-compressor (in .venv-quant) exports compressed-tensors the main environment loads and runs."""

import json

import pytest
import torch
import yaml

from llmstack.config.recipe import load_recipe
from llmstack.pipeline import run_recipe
from llmstack.quant.export import bytes_16bit, compress, vllm_kernel_for, weights_bytes


@pytest.fixture(scope="module")
def tiny_w4(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "w4a16"
    info = compress(tiny_model, out, "w4a16", "rtn", group_size=64)
    return out, info


def test_rtn_w4a16_export_is_compressed_tensors(tiny_w4, tiny_model):
    out, info = tiny_w4
    assert info["scheme"] == "w4a16" and info["method"] == "rtn"
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 64, "group")
    assert q["ignore"] == ["lm_head"]
    # Linear weights packed 8 per int32: much smaller than the 16-bit model even with the 16-bit embeddings kept.
    assert weights_bytes(out) < bytes_16bit(tiny_model)
    # What is not packed (embedding, norms, scales) is saved in bfloat16, not the float32 it was calibrated in.
    from safetensors import safe_open

    with safe_open(next(out.glob("*.safetensors")), "pt") as st:
        dtypes = {k: st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert {d for k, d in dtypes.items() if k.endswith(("norm.weight", "weight_scale"))} == {"BF16"}


def test_w4a16_loads_in_main_env_and_tracks_the_original(tiny_w4, tiny_model):
    from transformers import AutoModelForCausalLM

    out, _ = tiny_w4
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        a, b = ref(x).logits, q(x).logits
    assert not torch.equal(a, b)  # the weights really were rounded ...
    rel = (a - b).norm() / a.norm()
    assert rel < 0.5, rel  # ... but the model still computes roughly the same function


def test_calibration_runs_where_the_device_policy_says(tiny_w4, tiny_model, tmp_path, monkeypatch):
    """CPU run: calibrated on the CPU in float32 as before. A GPU run asks compress.py for CUDA in the card's 16-bit
    dtype; a quantization env whose torch has no CUDA (this one: the lock pins a CPU build) falls back and says so."""
    from llmstack.device import Capabilities
    from llmstack.quant.compress import calibration_device

    _, info = tiny_w4
    assert (info["device"], info["dtype"]) == ("cpu", "float32") and "device_note" not in info
    assert calibration_device("cuda", "bfloat16", cuda_here=True) == ("cuda", "bfloat16", None)
    assert calibration_device("cpu", "float32", cuda_here=True) == ("cpu", "float32", None)

    h100 = Capabilities(cuda=True, bf16=True, vllm=False, machine="x86_64")
    monkeypatch.setattr("llmstack.device.Capabilities.detect", staticmethod(lambda: h100))
    gpu_run = compress(tiny_model, tmp_path / "w4", "w4a16", "rtn", group_size=64)
    assert (gpu_run["device"], gpu_run["dtype"]) == ("cpu", "float32")
    assert "asked to calibrate on CUDA, but this quantization environment's torch has no CUDA" in gpu_run["device_note"]


def test_group_size_must_divide_hidden(tiny_model, tmp_path):
    from llmstack.quant.export import QuantizeError

    with pytest.raises(QuantizeError, match="does not divide the hidden size 128"):
        compress(tiny_model, tmp_path / "bad", "w4a16", "rtn", group_size=96)


def test_quantize_stage_in_a_recipe(tiny_model, tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({"name": "q", "model": {"source": str(tiny_model)},
                                    "quantize": {"scheme": "w4a16", "method": "rtn"}}))
    run = run_recipe(load_recipe(path), path, tmp_path / "runs")
    entry = run.manifest["stages"]["int4"]
    assert entry["status"] == "done"
    serve = json.loads((run.dir / "int4" / "serve.json").read_text())
    has_kernel, _, _ = vllm_kernel_for("w4a16")
    assert serve["scheme"] == ("w4a16" if has_kernel else "w8a8")  # no INT4 kernel here: the W8A8 fallback
    assert serve["dtype"] == vllm_kernel_for(serve["scheme"])[1]
    assert (run.dir / "int4" / serve["scheme"] / "config.json").exists()
    assert entry["metrics"]["w4a16"]["size_vs_16bit"] < 1
    # the serve stage follows that choice for the run's final model (the INT4 folder): where vLLM has no INT4 kernel
    # it serves the W8A8 export with vLLM, not the INT4 folder with transformers
    from llmstack.stages.serve import serving_target

    folder, engine, dtype, _ = serving_target("vllm", run.dir / "int4" / "w4a16", run.manifest)
    assert (folder.name, engine, dtype) == (serve["scheme"], "vllm", serve["dtype"])
    assert serving_target("hf", run.dir / "int4" / "w4a16", run.manifest)[:2] == (run.dir / "int4" / "w4a16", "hf")
    assert "## Quantization (int4)" in (run.dir / "report.md").read_text()


def test_where_vllm_serves_the_fallback_the_release_gates_judge_it(tiny_model, tmp_path, monkeypatch):
    """On an x86 CPU without AVX-512 vLLM has no INT4 kernel and the serve stage serves the W8A8 export instead: the
    eval stage then scores that export too, last, so the `min` gate decides on what is served, and says so."""
    import dataclasses

    from llmstack.device import Capabilities

    avx2 = dataclasses.replace(Capabilities.detect(), cuda=False, bf16=False, vllm=True, machine="x86_64",
                               avx512=False)
    monkeypatch.setattr(Capabilities, "detect", staticmethod(lambda: avx2))
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({
        "name": "q", "model": {"source": str(tiny_model)}, "quantize": {"scheme": "w4a16", "method": "rtn"},
        "eval": {"suite": "smoke", "tasks": ["arc_easy"], "limit": 4, "stages": ["base", "int4"],
                 "gates": {"min": {"arc_easy": 0.0}}},
        "serve": {"engine": "vllm", "smoke": False}}))
    run = run_recipe(load_recipe(path), path, tmp_path / "runs")
    scores = json.loads((run.dir / "eval" / "scores.json").read_text())
    assert list(scores) == ["base", "int4", "served-w8a8"]
    w4, w8 = scores["int4"]["arc_easy"], scores["served-w8a8"]["arc_easy"]
    assert w4["n"] == w8["n"] == 4 and w4["items"] != [] and w8["items"] != []
    section = (run.dir / "eval" / "section.md").read_text()
    assert "`served-w8a8` is what vLLM serves for `int4` on this machine" in section
    assert "(model evaluated last: `served-w8a8`)" in section  # the release decision is about the served export
    assert "| min.arc_easy >= 0.0 | served-w8a8 | arc_easy |" in section


VLLM_PROBE = '''
import sys, json
from llmstack.vllm_env import EngineCoreEnv, cpu_executor, set_cpu_env
if __name__ == "__main__":  # started as the offline batch engine starts one (llmstack/serve/batch.py)
    set_cpu_env()
    from vllm import LLM, SamplingParams
    core = EngineCoreEnv()
    with core.starting(eager=True):
        llm = LLM(model=sys.argv[1], dtype=sys.argv[2], enforce_eager=True, max_model_len=256, **cpu_executor())
    out = llm.generate(["hello world"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    print("PROBE " + json.dumps(out[0].outputs[0].token_ids))
    llm.llm_engine.engine_core.shutdown()
    core.remove()
'''


KERNEL_PROBE = '''
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()  # the kernel library vLLM itself loads on this CPU (_C, _C_AVX512 or _C_AVX2)
print("HAS_WNA16", hasattr(torch.ops._C, "cpu_gemm_wna16"))
'''


@pytest.mark.slow
def test_vllm_serves_w4a16_on_this_cpu_with_the_dtype_we_choose(tiny_w4, tmp_path):
    """The serving choice in vllm_kernel_for is a measured fact, not a guess: where it says yes, vLLM really generates
    with it; where it says no (an x86 CPU without AVX-512), the kernels vLLM loads here really lack the INT4 op."""
    import subprocess
    import sys

    out, _ = tiny_w4
    ok, dtype, why = vllm_kernel_for("w4a16")
    if not ok:
        proc = subprocess.run([sys.executable, "-c", KERNEL_PROBE], capture_output=True, text=True, timeout=300)
        assert "HAS_WNA16 False" in proc.stdout, (why, proc.stdout, proc.stderr[-2000:])
        return
    script = tmp_path / "probe.py"
    script.write_text(VLLM_PROBE)
    proc = subprocess.run([sys.executable, str(script), str(out), dtype], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert len(json.loads(lines[0][6:])) == 8
