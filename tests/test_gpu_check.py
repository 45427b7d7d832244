"""scripts/gpu_check.sh BLOCKS=e2e rehearsed on this CPU (GPU_CHECK_DRY=1): the same script and the same recipe as on
the GPU machine, with the tiny model and small sizes, through every stage (curate -> sft full -> sft LoRA -> dpo ->
int4 GPTQ -> eval -> serve with the hf engine -> report). It catches what would otherwise fail on scarce device time;
it says nothing about speed."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_e2e_block_rehearses_every_stage_on_the_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "BLOCKS": "e2e", "TMPDIR": str(tmp_path)}
    env.pop("PY", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=900)
    out = proc.stdout
    assert proc.returncode == 0 and "Error" not in out, out[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ")}
    stages = ["model", "curate", "sft_full", "sft_lora", "dpo", "int4", "eval", "serve", "report"]
    assert all(rows[s][0] == "done" for s in stages), rows
    assert rows["total"][0] == f"{len(stages)}/{len(stages)} done"
    # where each part ran: the device policy's CPU answers here (the GPU run prints cuda / bfloat16 in these places)
    from llmstack.device import policy

    hf_dtype = policy().hf_engine("bfloat16")[1]  # bfloat16 on a CPU with AVX512-BF16/AMX, else float32
    assert "GPTQ on cpu in float32" in rows["int4"][2] and f"hf engine on cpu in {hf_dtype}" in rows["serve"][2]
    assert rows["policy"][0] == "device cpu"
