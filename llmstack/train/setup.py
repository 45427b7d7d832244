"""Trainer arguments for a stage: llmstack's defaults < the device's defaults < the stage's own defaults < the
recipe's `args` (the user always wins), in TRL's config class for the stage kind; and the validation split."""

from __future__ import annotations

import importlib.util
from typing import Any

from llmstack.device import policy
from llmstack.train.loading import weights_dtype


def device_defaults(weights: str = "float32") -> dict[str, Any]:
    """TRL defaults to bf16=True and gradient_checkpointing=True. Both are wrong for small models: on a CPU without
    native bf16 it is emulated (≈4x slower), over bf16 weights autocast only adds casts, and checkpointing costs ≈1.7x;
    on an H100 the two together cost ≈8x for a 1.1B model that fits in memory anyway. The device policy
    (llmstack/device.py) chooses, for weights loaded in `weights`; the recipe's `args` still win."""
    return policy().trainer_defaults(weights)


def liger_defaults() -> dict[str, Any]:
    """For the sft and cpt stages on CUDA: Liger's fused kernels (RMSNorm, SwiGLU, RoPE, linear + cross-entropy without
    materialising the logits) cut a step's time and memory on GPUs (the sft path docs/gpus.md measured uses them).
    Only where liger-kernel is installed, and not for the preference/RL trainers, whose Liger losses are separate code
    paths."""
    import torch

    return {"use_liger_kernel": torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None}


def common_defaults(ctx) -> dict[str, Any]:
    return {
        "seed": ctx.recipe.seed,
        "logging_steps": 1,
        "report_to": ["tensorboard"],
        "save_total_limit": 2,
        "ddp_find_unused_parameters": False,  # LoRA freezes most parameters; the search costs a pass per step
        "disable_tqdm": False,
    }


def trainer_config(ctx, stage_defaults: dict[str, Any]):
    """TRL's config for this stage: output_dir is the stage folder, so checkpoints and TensorBoard logs live there.
    Every training stage calls this first: the checks that need no model run here (checkpoints.check_before_loading)."""
    from llmstack.config.trainer_args import trl_config_class
    from llmstack.train.checkpoints import check_before_loading

    spec = ctx.spec
    kwargs = {**common_defaults(ctx), **device_defaults(weights_dtype(ctx)), **stage_defaults, **spec.args}
    args = trl_config_class(spec.type)(output_dir=str(ctx.dir), **kwargs)  # sets up accelerate's processes
    check_before_loading(ctx)
    return args


def eval_split(data, args):
    """The curated validation split, when the recipe asks for evaluation (args.eval_strategy) and it has rows."""
    if str(getattr(args, "eval_strategy", "no")) in ("no", "IntervalStrategy.NO"):
        return None
    split = data.get("validation")
    return split if split is not None and len(split) else None


def recipe_error(ctx, field: str, message: str):
    """A RecipeError naming this stage's YAML path (`stages[i].<field>`), for what only the curated data or the loaded
    models can show (a recipe check that could not run before curation); the caller raises it before any training."""
    from llmstack.config.recipe import RecipeError

    index = next(i for i, s in enumerate(ctx.recipe.stages) if s.id == ctx.name)
    return RecipeError(ctx.recipe_path, [f"stages[{index}].{field}: {message}"])
