#!/usr/bin/env bash
# The wheels `BLOCKS=e2e bash scripts/gpu_check.sh` needs on the GPU machine (Python 3.12, no registry there), into
# ./.whl (gitignored; carry it): trl, datasets and pydantic (as ../shared/gpu/fetch_wheels.sh) without bitsandbytes and
# liger-kernel (the e2e recipe uses neither), plus llm-compressor for GPTQ on the GPU (no vLLM on that machine, so its
# compressed-tensors pin does not conflict: the main interpreter is the quantization one) and lm-eval with what it
# imports at start (scikit-learn and scipy: 43 MB of the total). Versions: requirements/main.lock and quant.lock.
# Measured 2026-12-01: 24 wheels, 66.6 MB = 63.5 MiB, just under the 64 MiB a run may carry: carry nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 auto-round==0.15.1 nvidia-ml-py==13.615.71 \
  lm_eval==0.4.13 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 \
  scikit-learn==1.9.1 scipy==1.17.1 joblib==1.6.0 threadpoolctl==3.8.0 "$@"
du -sh .whl
