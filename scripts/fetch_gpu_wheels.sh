#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs on a GPU machine without a package index (Python 3.12, x86-64 manylinux),
# downloaded here into ./.whl (gitignored; carry it to the GPU machine). Run from anywhere:
#   bash scripts/fetch_gpu_wheels.sh        the training blocks (the default set, and BLOCKS=mfu): trl, datasets,
#                                           bitsandbytes (QLoRA), liger-kernel (fused kernels), pydantic
#   bash scripts/fetch_gpu_wheels.sh e2e    BLOCKS=e2e: trl, datasets and pydantic without bitsandbytes and liger-kernel
#                                           (the e2e recipe uses neither), plus llm-compressor for GPTQ on the GPU (no
#                                           vLLM on that machine, so its compressed-tensors pin does not conflict: the
#                                           main interpreter is the quantization one) and lm-eval with what it imports
#                                           at start (scikit-learn and scipy: most of the e2e set's size)
# Versions: requirements/main.lock and quant.lock (liger-kernel: the version the GPU results in docs/gpus.md used).
# Extra arguments after the set's name are more pip requirements. The e2e set is just under the 64 MiB a device run
# may carry: carry nothing else with it.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:-training}; shift || true
COMMON="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5"
case "$SET" in
  training) WHEELS="$COMMON bitsandbytes==0.50.2 liger-kernel==0.8.5" ;;
  e2e) WHEELS="$COMMON llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 auto-round==0.15.1
         nvidia-ml-py==13.615.71 lm_eval==0.4.13 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6
         lxml==6.1.3 scikit-learn==1.9.1 scipy==1.17.1 joblib==1.6.0 threadpoolctl==3.8.0" ;;
  *) echo "usage: bash scripts/fetch_gpu_wheels.sh [training|e2e] [more requirements...]" >&2; exit 2 ;;
esac
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  # WHEELS is a list of requirements
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS "$@"
du -sh .whl
