#!/usr/bin/env bash
# The training GPU check for one H100/H200 (docs/gpus.md): a numerical check of the varlen attention kernel, SFT full
# and LoRA (each: TRL defaults vs the llmstack path vs the llmstack path on SDPA; tokens/s, MFU, peak memory), then
# QLoRA and DPO steps through the real llmstack stages, then a GRPO step.
# A GPU machine without a package index (torch and CUDA installed, no trl, datasets, pydantic...): first, on a machine
# with one, `bash scripts/fetch_gpu_wheels.sh` (for BLOCKS=e2e: `bash scripts/fetch_gpu_wheels.sh e2e`), then run this
# script there with `.whl` carried along:   bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
# Model: the 1.1B Llama shape (TinyLlama) with random weights: throughput does not depend on them, and no hub is needed.
# GPU_CHECK_DRY=1 runs every block on this CPU with the tiny model (a rehearsal: catches errors before device time).
# BLOCKS=e2e (not in the default set): one recipe through every stage on the GPU with `llmstack run` (curate -> sft
# full -> sft LoRA -> dpo -> int4 GPTQ -> eval -> serve with the hf engine -> report), sized for minutes on an H200
# (never run on a GPU yet). Its wheels differ (llm-compressor, lm-eval): `bash scripts/fetch_gpu_wheels.sh e2e` first,
# then `BLOCKS=e2e bash scripts/gpu_check.sh` there with .whl carried. Rehearsal: GPU_CHECK_DRY=1 BLOCKS=e2e.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${GPU_CHECK_DRY:-0}" = 1 ] && [ -z "${PY:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi  # rehearsal: the project env
PY=${PY:-python3}
NEED="trl, datasets, bitsandbytes"; [[ " ${BLOCKS:-} " == *" e2e "* ]] && NEED="trl, datasets, llmcompressor, lm_eval"
if [ "${GPU_CHECK_DRY:-0}" != 1 ] && ! $PY -c "import $NEED" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run bash scripts/fetch_gpu_wheels.sh (for BLOCKS=e2e: bash scripts/fetch_gpu_wheels.sh e2e) where a package index is reachable, and carry .whl"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
STEPS=${STEPS:-6}
BLOCKS=${BLOCKS:-"kernel sft lora stages grpo"}  # a subset reruns only those blocks; "mfu" (not in the default
# set) times the MFU candidates next to the sft block's paths: BLOCKS=mfu bash scripts/gpu_check.sh
want() { [[ " $BLOCKS " == *" $1 "* ]]; }
# a rehearsal's benchmark records (the tiny model's timings on this CPU) go to a temp folder, not benchmarks/results/
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then MODEL=tiny; SIZE="--batch 2 --max-length 256"; STEPS=2
  REHEARSAL_RECORDS=$(mktemp -d); trap 'rm -rf "$REHEARSAL_RECORDS"' EXIT; export LLMSTACK_BENCH_RESULTS=$REHEARSAL_RECORDS; else
  MODEL=llama-1.1b-random; SIZE="--batch 8 --max-length 2048"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
$PY -c "import torch, transformers, trl, peft; from llmstack.train import attention
import importlib.util as u; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__,
'peft', peft.__version__, 'liger', u.find_spec('liger_kernel') is not None, 'varlen kernel', attention.available())"

want kernel && echo "== varlen attention kernel vs per-document SDPA (bf16, GQA 32/4 heads, 8 documents, forward and backward) =="
want kernel && timeout 120 $PY scripts/gpu_stages.py kernel 2>&1 | grep "^|\|Error"
want sft && echo "== SFT full fine-tune, 1.1B, batch 8 x 2048 =="
want sft && timeout 240 $PY scripts/bench_train.py --model $MODEL --steps "$STEPS" $SIZE 2>&1 | grep -A6 "^model \|Error"
want mfu && echo "== SFT full, 1.1B, batch 8 x 2048: the candidates for more MFU (bf16 weights; torch.compile; bf16 weights at 2x micro-batch; Liger FLCE where installed) =="
want mfu && timeout 420 $PY scripts/bench_train.py --model $MODEL --steps "$STEPS" $SIZE --candidates 2>&1 | grep -A8 "^model \|Error"
want lora && echo "== SFT LoRA r=16 all-linear, 1.1B, batch 8 x 2048 =="
want lora && timeout 180 $PY scripts/bench_train.py --model $MODEL --steps "$STEPS" $SIZE --lora 2>&1 | grep -A6 "^model \|Error"

want stages && echo "== QLoRA sft and LoRA dpo through the llmstack stages (1.1B) =="
want stages && timeout 180 $PY scripts/gpu_stages.py stages 2>&1 | grep "^|\|Error"

want grpo && echo "== GRPO: LoRA r=16 on the 1.1B, rule-based rewards, transformers generation (no vLLM on this machine) =="
want grpo && timeout 180 $PY scripts/gpu_stages.py grpo 2>&1 | grep "^|\|Error"

want e2e && echo "== e2e: curate -> sft full -> sft LoRA -> dpo -> int4 GPTQ -> eval -> serve (hf engine) -> report =="
# the quantization interpreter: the GPU machine's own python (no vLLM there); the rehearsal's .venv-quant
QPY=${LLMSTACK_QUANT_PYTHON:-$PY}; [ "${GPU_CHECK_DRY:-0}" = 1 ] && QPY=${LLMSTACK_QUANT_PYTHON:-.venv-quant/bin/python}
want e2e && { { $PY -c "import lm_eval" && $QPY -c "import llmcompressor"; } 2>/dev/null \
  || echo "Error: e2e needs lm-eval ($PY) and llm-compressor ($QPY): run bash scripts/fetch_gpu_wheels.sh e2e where a package index is reachable, and carry .whl"; }
want e2e && timeout 540 $PY scripts/gpu_stages.py e2e 2>&1 | grep "^|\|Error"
