#!/usr/bin/env bash
# The training GPU check for one H100/H200 (see ../shared/gpu/README.md): a numerical check of the varlen attention
# kernel, SFT full and LoRA (each: TRL defaults vs the llmstack path vs the llmstack path on SDPA; tokens/s, MFU, peak
# memory), then QLoRA and DPO steps through the real llmstack stages, then a GRPO step (issue 10).
# The GPU machine has no registry: first, here, `echo /.whl/ >> .git/info/exclude && ../shared/gpu/fetch_wheels.sh`,
# then run this script there with `.whl` carried along:   bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
# Model: the 1.1B Llama shape (TinyLlama) with random weights: throughput does not depend on them, and no hub is needed.
# GPU_CHECK_DRY=1 runs every block on this CPU with the tiny model (a rehearsal: catches errors before device time).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! $PY -c "import trl, datasets, bitsandbytes" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run ../shared/gpu/fetch_wheels.sh here first and carry .whl"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
STEPS=${STEPS:-6}
BLOCKS=${BLOCKS:-"kernel sft lora stages grpo"}  # a subset reruns only those blocks
want() { [[ " $BLOCKS " == *" $1 "* ]]; }
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then MODEL=tiny; SIZE="--batch 2 --max-length 256"; STEPS=2; else
  MODEL=llama-1.1b-random; SIZE="--batch 8 --max-length 2048"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
$PY -c "import torch, transformers, trl, peft; from llmstack.train import attention
import importlib.util as u; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__,
'peft', peft.__version__, 'liger', u.find_spec('liger_kernel') is not None, 'varlen kernel', attention.available())"

want kernel && echo "== varlen attention kernel vs per-document SDPA (bf16, GQA 32/4 heads, 8 documents, forward and backward) =="
want kernel && timeout 120 $PY - <<'PY' 2>&1 | grep "^|\|Error\|error"
import torch
from llmstack.train import attention
if not attention.available():
    print("| skipped: no CUDA varlen kernel here |")
    raise SystemExit
torch.manual_seed(0)
lens = [37, 512, 1, 900, 64, 300, 128, 106]
cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
q = torch.randn(sum(lens), 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(sum(lens), 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(sum(lens), 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(q)
res = {}
for name, kern in [("varlen", attention._varlen_kernel()), ("reference", attention.reference_kernel)]:
    out = kern(q, k, v, cu, max(lens), 64 ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), g)
    res[name] = (out.float(), [t.float() for t in grads])
(o1, g1), (o2, g2) = res["varlen"], res["reference"]
print("| tensor | max abs diff | max abs value |")
for name, a, b in [("out", o1, o2), ("dq", g1[0], g2[0]), ("dk", g1[1], g2[1]), ("dv", g1[2], g2[2])]:
    print(f"| {name} | {(a - b).abs().max().item():.3g} | {b.abs().max().item():.3g} |")
PY
want sft && echo "== SFT full fine-tune, 1.1B, batch 8 x 2048 =="
want sft && timeout 240 $PY scripts/bench_train.py --model $MODEL --steps "$STEPS" $SIZE 2>&1 | grep -A6 "^model \|Error"
want lora && echo "== SFT LoRA r=16 all-linear, 1.1B, batch 8 x 2048 =="
want lora && timeout 180 $PY scripts/bench_train.py --model $MODEL --steps "$STEPS" $SIZE --lora 2>&1 | grep -A6 "^model \|Error"

want stages && echo "== QLoRA sft and LoRA dpo through the llmstack stages (1.1B) =="
want stages && timeout 180 $PY - <<'PY' 2>&1 | grep "^|\|Error\|error"
import os, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, "tests")
sys.path.insert(0, "scripts")
from bench_train import random_llama_1b, synthetic_chat
from train_data import make_ctx, make_recipe, preference_dataset
from datasets import DatasetDict
from llmstack.pipeline import stage_function

root = Path(tempfile.mkdtemp())
dry = os.environ.get("GPU_CHECK_DRY") == "1"  # CPU dry run of this block with the tiny model
if dry:
    from llmstack.testing import build_tiny_model
    model = build_tiny_model(root / "m")
else:
    model = random_llama_1b(Path(tempfile.gettempdir()) / "llmstack-llama-1.1b-random")
cuda = torch.cuda.is_available()
chat = root / "chat"
rows = synthetic_chat(256)
DatasetDict({"train": rows, "validation": rows.select(range(8))}).save_to_disk(str(chat))
prefs = preference_dataset(root / "prefs", n=256)
size = {"max_steps": 2 if dry else 6, "per_device_train_batch_size": 8, "max_length": 256 if dry else 2048, "report_to": [], "save_strategy": "no"}
print("| stage | adapter | steps | tokens/s | peak GiB | s |")
for stage, ds, schema, adapter in [("sft", chat, "messages", "qlora"), ("dpo", prefs, "preference", "lora")]:
    spec = {"type": stage, "dataset": "d", adapter: {"r": 16, "compute_dtype": "bfloat16"} if adapter == "qlora"
            else {"r": 16}, "args": size}
    recipe = make_recipe(model, {"d": (schema, ds)}, [spec])
    recipe.model.dtype = "bfloat16" if cuda else "float32"
    ctx = make_ctx(recipe, root / "runs", stage, model, {"d": ds})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    m = stage_function(stage)(ctx).metrics
    print(f"| {stage} | {adapter} | {m['steps']} | {m['tokens_per_s']} | "
          f"{torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.1f} | {time.time() - t0:.0f} |")
PY

want grpo && echo "== GRPO (issue 10): LoRA r=16 on the 1.1B, rule-based rewards, transformers generation (no vLLM on this machine) =="
# Reports steps/s and peak memory. Generation dominates a GRPO step: 4 prompts x 8 completions x 256 new tokens through
# HF generate (random weights never emit the end of turn, so every completion runs the full 256: the worst case).
want grpo && timeout 180 $PY - <<'PY' 2>&1 | grep "^|\|Error\|error"
import os, sys, tempfile, time
from pathlib import Path
import torch
sys.path.insert(0, "tests")
sys.path.insert(0, "scripts")
from bench_train import random_llama_1b
from train_data import make_ctx, make_recipe
from datasets import Dataset, DatasetDict
from llmstack.pipeline import stage_function

root = Path(tempfile.mkdtemp())
dry = os.environ.get("GPU_CHECK_DRY") == "1"  # CPU dry run of this block with the tiny model
if dry:
    from llmstack.testing import build_tiny_model
    model = build_tiny_model(root / "m")
else:
    model = random_llama_1b(Path(tempfile.gettempdir()) / "llmstack-llama-1.1b-random")
cuda = torch.cuda.is_available()
rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}? End with '#### <number>'."},
                      {"role": "assistant", "content": f"{a} + {b} = {a + b}\n#### {a + b}"}]}
        for a in range(1, 17) for b in range(1, 5)]
gsm = root / "gsm"
DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:4])}).save_to_disk(str(gsm))
args = {"max_steps": 2 if dry else 4, "per_device_train_batch_size": 8 if dry else 32, "num_generations": 8,
        "max_completion_length": 16 if dry else 256,
        "learning_rate": 1e-5, "report_to": [], "save_strategy": "no"}
spec = {"type": "grpo", "dataset": "d", "lora": {"r": 16}, "args": args,
        "rewards": [{"type": "gsm8k_answer"}, {"type": "format", "pattern": "#### -?\\d+", "weight": 0.2}]}
recipe = make_recipe(model, {"d": ("messages", gsm)}, [spec])
recipe.model.dtype = "bfloat16" if cuda else "float32"
ctx = make_ctx(recipe, root / "runs", "grpo", model, {"d": gsm})
if cuda:
    torch.cuda.reset_peak_memory_stats()
t0 = time.time()
m = stage_function("grpo")(ctx).metrics
s = time.time() - t0
print("| stage | adapter | steps | completions/step | steps/s | peak GiB | s | reward first -> last |")
print(f"| grpo | lora | {m['steps']} | 32 x 256 tok | {m['steps'] / m['train_runtime_s']:.3f} | "
      f"{torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.1f} | {s:.0f} | {m['reward_first']} -> {m['reward_last']} |")
PY
