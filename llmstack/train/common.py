"""What the three training stages share: device defaults, model loading (full / LoRA / QLoRA), the training chat
template, resume, merge-and-save, and the stage's report (loss curve PNG, section.md, metrics).

The stage modules (cpt.py, sft.py, dpo.py) stay straight TRL calls; everything here is plumbing around them that
would otherwise be copied three times.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmstack.device import policy
from llmstack.runs import sha256_json

log = logging.getLogger("llmstack")

# ---------------------------------------------------------------------------------------------------------------------
# Trainer arguments: our defaults < device defaults < the recipe's `args` (the user always wins)
# ---------------------------------------------------------------------------------------------------------------------


def device_defaults() -> dict[str, Any]:
    """TRL defaults to bf16=True and gradient_checkpointing=True. Both are wrong for small models: on an AVX2 CPU bf16
    is emulated (≈4x slower) and checkpointing costs ≈1.7x; on an H100 the two together cost ≈8x for a 1.1B model
    that fits in memory anyway. The device policy (llmstack/device.py) chooses; the recipe's `args` still win."""
    return policy().trainer_defaults()


def liger_defaults() -> dict[str, Any]:
    """For the sft and cpt stages on CUDA: Liger's fused kernels (RMSNorm, SwiGLU, RoPE, linear + cross-entropy without
    materialising the logits) are worth ~1.4x and half the memory on an H100 (../shared/gpu/README.md). Only where
    liger-kernel is installed, and not for the preference/RL trainers, whose Liger losses are separate code paths."""
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
    """TRL's config for this stage: output_dir is the stage folder, so checkpoints and TensorBoard logs live there."""
    from llmstack.config.train import trl_config_class

    spec = ctx.spec
    kwargs = {**common_defaults(ctx), **device_defaults(), **stage_defaults, **spec.args}
    return trl_config_class(spec.type)(output_dir=str(ctx.dir), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def _dtype(name: str):
    import torch

    return getattr(torch, name)


@contextmanager
def whole_model_here():
    """Load (and merge, generate with) a whole model in this process alone, also under DeepSpeed ZeRO-3.

    With ZeRO-3's `zero3_init_flag`, transformers' `from_pretrained` builds the model inside `deepspeed.zero.Init`,
    which partitions every parameter across the ranks: a collective call. Rank 0 merging an adapter or answering the
    probes alone would wait forever for ranks that never join (seen: a 2-process CPU launch hung after training), and
    a partitioned model holds empty tensors. Inside this block transformers sees no DeepSpeed config, so the model
    loads whole on this rank (for training, deepspeed.initialize partitions it later all the same)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its deepspeed integration module
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # the one global from_pretrained consults
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def packed_attention(args) -> str | None:
    """The attention implementation for a padding-free packed stage: PyTorch's varlen flash kernel where it runs
    (llmstack/train/attention.py), else None (transformers' SDPA with a block-diagonal mask: correct, slower)."""
    from llmstack.train import attention

    padding_free = args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"})
    return attention.register() if padding_free and attention.available() else None


def load_model(folder: Path, dtype: str, qlora=None, attention: str | None = None, scratch: Path | None = None):
    """The stage's starting model. A folder holding only an adapter (from a stage with lora.merge: false) is loaded
    onto its base and merged in memory, so every stage trains a plain model; under QLoRA the merge goes to disk first
    (`merged_copy` in `scratch`, the stage's own folder), as the 4-bit load needs a folder."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = Path(folder)
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype)}
    if attention:
        kwargs["attn_implementation"] = attention
    if qlora is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qlora.quant_type, bnb_4bit_use_double_quant=qlora.double_quant,
            bnb_4bit_compute_dtype=_dtype(qlora.compute_dtype))
    if (folder / "adapter_config.json").exists():
        if qlora is not None:
            folder = merged_copy(folder, scratch or folder.parent, dtype)
        else:
            from peft import PeftModel

            # merged whole on every rank (a ZeRO-3 partitioned base has no weights to merge into); DeepSpeed
            # partitions the merged model when the trainer prepares it
            base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            with whole_model_here():
                model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
                return PeftModel.from_pretrained(model, folder).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def peft_config(spec):
    adapter = spec.lora or spec.qlora
    if adapter is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=adapter.target_modules, task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------------------------------
# Chat template with {% generation %} markers (for assistant-only loss)
# ---------------------------------------------------------------------------------------------------------------------

# SmolLM2's (and most ChatML models') template writes every message with one expression. TRL's assistant-only loss
# needs the assistant part wrapped in {% generation %}; we rewrite that one expression and then check the result
# renders byte-identically to the original, so training sees exactly the text the model is served with.
_CHATML_MESSAGE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_CHATML_MESSAGE_MARKED = (
    "{% if message['role'] == 'assistant' %}"
    "{{'<|im_start|>assistant\n'}}{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}"
    "{% else %}" + _CHATML_MESSAGE + "{% endif %}"
)

_PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6\nDone."}],
]


class ChatTemplateError(ValueError):
    pass


def training_chat_template(tokenizer) -> str:
    """The template to train with: the tokenizer's own if it has generation markers, else a marked equivalent."""
    from trl.chat_template_utils import has_generation_markers

    original = tokenizer.chat_template
    if not original:
        raise ChatTemplateError("the model's tokenizer has no chat template; an sft stage trains on chat messages")
    if has_generation_markers(original):
        return original
    if _CHATML_MESSAGE not in original:
        raise ChatTemplateError(
            "the chat template has no {% generation %} markers and is not a ChatML template llmstack can mark; "
            "set `args.assistant_only_loss: false` for this stage (trains on the whole conversation)")
    marked = original.replace(_CHATML_MESSAGE, _CHATML_MESSAGE_MARKED)
    for conv in _PROBE_CONVERSATIONS:
        for gen_prompt, msgs in ((False, conv), (True, conv[:-1])):
            a = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            b = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt,
                                              chat_template=marked)
            if a != b:
                raise ChatTemplateError(f"marked chat template renders differently from the original: {a!r} != {b!r}")
    return marked


def tool_chat_template(tokenizer, assistant_only_loss: bool) -> str:
    """The template to train a tool dataset with AND to save with the model, so serving renders tools exactly as
    training did: the model's own when it renders tools, else llmstack's tool template (TRL's Qwen2.5 training
    template with the model's own system line, llmstack.tools). TRL renders one tool conversation to confirm (its
    `supports_tool_calling`); a template that renders tools but lacks {% generation %} markers gets TRL's training
    variant of it when assistant-only loss is on."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        supports_tool_calling,
    )

    from llmstack import tools

    original = tokenizer.chat_template
    tokenizer.chat_template = tools.template_for(tokenizer)
    try:
        if not supports_tool_calling(tokenizer):
            raise ChatTemplateError("the dataset has tool calls, but the model's chat template does not render them "
                                    "(TRL's supports_tool_calling): use a model whose template renders `tools` and "
                                    "`tool_calls`, or a dataset without tools")
        template = tokenizer.chat_template
        if assistant_only_loss and not has_generation_markers(template):
            try:
                template = get_training_chat_template(tokenizer) or template
            except ValueError:
                raise ChatTemplateError("the model's tool-calling chat template has no {% generation %} markers and "
                                        "TRL has no training variant of it; set `args.assistant_only_loss: false` "
                                        "for this stage") from None
        return template
    finally:
        tokenizer.chat_template = original


def check_single_bos(tokenizer, text: str) -> None:
    """A chat template that writes BOS plus a tokenizer that adds one gives <bos><bos>: a silent quality loss."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return
    ids = tokenizer(text).input_ids
    if len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise ValueError(f"tokenised training text starts with two BOS tokens ({tokenizer.bos_token!r})")


# ---------------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------------


def check_sharding(trainer) -> None:
    """A launch config that asks for FSDP must get FSDP. accelerate (1.15) upgrades only GPU-like device types to
    FSDP: processes on the CPU (TRL's `use_cpu`) run plain data parallel (MULTI_CPU) with FSDP asked for, every
    rank holding the whole model. That would train, but not what the config says: refuse with the reason."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    got = str(trainer.accelerator.distributed_type).split(".")[-1]
    if asked and got != "FSDP":
        raise RuntimeError(f"the launch config asks for FSDP, but accelerate runs these processes as {got}: accelerate "
                           "shards with FSDP only on GPUs (or other accelerators), not on the CPU. Launch with "
                           "recipes/accelerate/cpu-ddp.yaml on a CPU, or fsdp2.yaml on GPUs")
    pinned = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")  # the launch config's deepspeed value
    steps = trainer.args.gradient_accumulation_steps
    if got == "DEEPSPEED" and pinned.isdigit() and int(pinned) != steps:
        raise RuntimeError(f"the launch config sets deepspeed_config.gradient_accumulation_steps: {pinned}, but this "
                           f"stage's args.gradient_accumulation_steps is {steps}; DeepSpeed would train with {pinned}. "
                           "Remove the key from the accelerate config (the recipe's value is then used) or set the "
                           "two to the same number")


def last_complete_checkpoint(folder: Path) -> tuple[Path | None, list[Path]]:
    """(the newest checkpoint the trainer finished writing, the newer ones it did not). transformers writes
    trainer_state.json last (after weights, optimizer and RNG state), so a process killed while saving (SIGKILL, OOM
    killer, preemption) leaves a folder without it, which `get_last_checkpoint` would pick and fail to resume from."""
    import re

    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    found.sort(key=lambda p: int(p.name.split("-")[1]), reverse=True)
    partial = []
    for ckpt in found:
        if (ckpt / "trainer_state.json").exists():
            return ckpt, partial
        partial.append(ckpt)
    return None, partial


def _plain_cpu_device(args) -> None:
    """Processes on the CPU launched together (gloo) get the device `cpu:0` from accelerate 1.15 (MULTI_CPU indexes
    the device by local rank modulo torch.cpu.device_count()), and the Trainer resumes a multi-process run with
    `torch.load(optimizer.pt, map_location=args.device)`, which torch 2.13 refuses for `cpu:0` ("don't know how to
    restore data location ... tagged with cpu:0"): every killed 2-process CPU run failed to resume. `cpu` is the same
    memory; the Trainer reads the device from this cached property."""
    import torch

    device = args.device
    if device.type == "cpu" and device.index is not None:
        args.__dict__["_setup_devices"] = torch.device("cpu")


def check_shared_folder(accelerator, folder: Path, patience_s: float = 10.0) -> None:
    """Every process must see the same stage folder: rank 0 alone writes the model, the checkpoints and the manifest,
    and each rank resumes from the checkpoints it finds there. Launched on several machines with `--runs-dir` on each
    node's own disk, the ranks would resume from different steps (their step counts part and the collectives hang) or
    lose rank 0's checkpoints with its node. Checked before training: rank 0 writes a fresh token into the folder and
    every rank must read it back (retried for `patience_s`: NFS may show a new file late)."""
    import secrets
    import socket
    import time

    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    token = [secrets.token_hex(16) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    marker = Path(folder) / ".llmstack-shared-check"
    if accelerator.is_main_process:
        marker.write_text(token[0])
    accelerator.wait_for_everyone()
    deadline, seen = time.monotonic() + patience_s, False
    while not seen:
        try:
            seen = marker.read_text().strip() == token[0]
        except OSError:
            pass
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    everyone = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, host, ok in everyone if not ok]
    if blind:
        raise RuntimeError(f"{', '.join(blind)} cannot see what rank 0 writes into {folder}: every node must reach the "
                           "run folder on a shared filesystem (NFS, Lustre, a mounted bucket). Pass the same shared "
                           "--runs-dir on every node (scripts/slurm/train.sbatch: RUNS_DIR)")


def resume_checkpoint(ctx, trainer) -> str | None:
    """The last checkpoint in the stage folder if it was written for these same inputs, else None (and stale
    checkpoints are removed, so a changed recipe never resumes from another run's state). The trainer's own
    resume restores model, optimizer, scheduler and RNG state and skips the batches already seen: same data order."""
    check_sharding(trainer)
    check_shared_folder(trainer.accelerator, ctx.dir)
    identity = sha256_json({"spec": ctx.spec.model_dump(mode="json"), "model": str(ctx.model),
                            "datasets": {k: str(v) for k, v in ctx.datasets.items()}, "seed": ctx.recipe.seed})
    stamp = ctx.dir / "resume-inputs.sha256"
    last, partial = last_complete_checkpoint(ctx.dir)
    fresh = bool(last) and stamp.exists() and stamp.read_text().strip() == identity
    trainer.accelerator.wait_for_everyone()  # every rank decides before rank 0 touches the folder
    launched = ctx.dir / "resume-processes.txt"
    processes = trainer.accelerator.num_processes
    before = int(launched.read_text()) if fresh and launched.exists() else processes
    if before != processes:
        raise RuntimeError(
            f"{last.name} in {ctx.dir} was written by a launch of {before} processes; this one has "
            f"{processes}. Resumed so, the trainer would take another global batch and split the data between ranks "
            "otherwise (examples seen twice or never). Launch again on as many processes "
            f"(the same node count), or delete {ctx.dir}/checkpoint-* to train the stage again from step 0")
    if fresh:
        if trainer.accelerator.is_main_process:
            for cut in partial:  # a kill mid-save left it; the step is trained (and saved) again
                log.info("removing %s: cut short by the kill (no trainer_state.json)", cut.name)
                shutil.rmtree(cut, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        _plain_cpu_device(trainer.args)
        log.info("resuming %s from %s", ctx.name, last)
        trainer.llmstack_resumed_from = int(last.name.split("-")[1])  # reported in the stage's metrics
        return str(last)
    if trainer.accelerator.is_main_process:
        for old in ctx.dir.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        stamp.write_text(identity)
        launched.write_text(str(processes))
    trainer.accelerator.wait_for_everyone()
    return None


def eval_split(data, args):
    """The curated validation split, when the recipe asks for evaluation (args.eval_strategy) and it has rows."""
    if str(getattr(args, "eval_strategy", "no")) in ("no", "IntervalStrategy.NO"):
        return None
    split = data.get("validation")
    return split if split is not None and len(split) else None


# ---------------------------------------------------------------------------------------------------------------------
# Multi-process: the pipeline hands a stage with `launch:` to `accelerate launch -m llmstack.cli.launch`
# ---------------------------------------------------------------------------------------------------------------------


def in_launched_process() -> bool:
    return os.environ.get("LLMSTACK_LAUNCHED") == "1"


def launch(ctx):
    """Run this stage under `accelerate launch` with the stage's config; rank 0 leaves result.json for us."""
    from llmstack.config.train import launch_config_path
    from llmstack.stage import StageResult

    result_file = ctx.dir / "result.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config_path(ctx.spec.launch)),
           "-m", "llmstack.cli.launch", str(Path(ctx.recipe_path).resolve()), "--stage", ctx.name,
           "--run-id", ctx.run.dir.name, "--runs-dir", str(ctx.run.dir.parent.parent.resolve()), "--no-record"]
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env={**os.environ, "LLMSTACK_LAUNCHED": "1"})
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"`accelerate launch` of stage {ctx.name} failed (exit {proc.returncode}); see its log above")
    res = json.loads(result_file.read_text())
    model = Path(res["model"])
    return StageResult(outputs={"model": model}, metrics=res["metrics"], model=model)


# ---------------------------------------------------------------------------------------------------------------------
# Save: a plain HF folder (merged) or a stacked adapter, with the ORIGINAL chat template and end-of-turn eos
# ---------------------------------------------------------------------------------------------------------------------


def merged_copy(adapter_dir: Path, stage_dir: Path, dtype: str) -> Path:
    """An adapter-only folder merged onto its base, on disk in the stage's own folder (`merged-input`, removed when the
    stage finishes). Rank 0 merges while the other ranks wait, then they find it. Written to a temporary folder and
    renamed when whole, and stamped with the adapter's hash: a merge cut short by a crash, or an upstream stage that
    trained again into the same folder, is merged anew instead of being taken for the input."""
    import hashlib

    from accelerate import PartialState

    digest = hashlib.sha256()
    for f in sorted(Path(adapter_dir).glob("adapter_*")):  # adapter_config.json, adapter_model.safetensors
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    stamp, out = digest.hexdigest(), Path(stage_dir) / "merged-input"
    with PartialState().main_process_first():  # rank 0 writes the folder, the others then find it
        if (out / "adapter.sha256").exists() and (out / "adapter.sha256").read_text() == stamp:
            return out
        tmp = Path(stage_dir) / f"merged-input.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _merge_adapter(Path(adapter_dir), tmp, dtype)
        (tmp / "adapter.sha256").write_text(stamp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _merge_adapter(adapter_dir: Path, out: Path, dtype: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    # Merge into a full-precision copy of the base, never into a 4-bit one (QLoRA): the result is a plain model.
    # Called on one rank: the whole model loads here even under ZeRO-3.
    with whole_model_here():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=_dtype(dtype))
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)


def save_model(trainer, ctx, tokenizer, chat_template: str | None) -> Path:
    """Write ctx.dir/model. Call on every process (FSDP/ZeRO gather the weights collectively)."""
    from transformers import GenerationConfig

    spec = ctx.spec
    adapter = spec.lora or spec.qlora
    out = ctx.dir / "model"
    if adapter is None:
        trainer.save_model(str(out))
    else:
        target = ctx.dir / "adapter" if adapter.merge else out
        trainer.save_model(str(target))
        if adapter.merge and trainer.accelerator.is_main_process:
            _merge_adapter(target, out, ctx.recipe.model.dtype)
        elif trainer.accelerator.is_main_process:
            # A stacked adapter names its base: this stage's input model (loaded and merged by the next stage).
            cfg_file = out / "adapter_config.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["base_model_name_or_path"] = str(Path(ctx.model).resolve())
            cfg_file.write_text(json.dumps(cfg, indent=2))
    if trainer.accelerator.is_main_process:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out)
        # The input model's generation_config carries the end-of-turn eos (<|im_end|>): keep it verbatim.
        source = Path(ctx.model)
        if (source / "generation_config.json").exists():
            GenerationConfig.from_pretrained(source).save_pretrained(out)
    trainer.accelerator.wait_for_everyone()
    return out


def cleanup_checkpoints(ctx) -> None:
    """A finished stage's checkpoints are only useful for resuming it; drop them (full-FT ones are 3x the model)."""
    for old in ctx.dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)
    for merged in ctx.dir.glob("merged-input*"):  # the merged adapter input, and a merge a crash cut short
        shutil.rmtree(merged, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Report: metrics, loss curve, section.md
# ---------------------------------------------------------------------------------------------------------------------


def metrics_from(trainer, train_output) -> dict[str, Any]:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    runtime = train_output.metrics.get("train_runtime", 0.0)
    m = {
        "steps": trainer.state.global_step,
        "train_loss": round(float(train_output.training_loss), 5),
        "first_loss": round(float(losses[0]), 5) if losses else None,
        "last_loss": round(float(losses[-1]), 5) if losses else None,
        "train_runtime_s": round(float(runtime), 2),
        "tokens": int(tokens),
        "tokens_per_s": round(tokens / runtime, 2) if runtime else None,
        "world_size": trainer.args.world_size,
        # how the processes split the work (NO, MULTI_GPU = DDP, FSDP, DEEPSPEED), and FSDP's version when sharded
        "distributed": str(trainer.accelerator.distributed_type).split(".")[-1],
        # what the processes really accumulated (under DeepSpeed: its config's value, which accelerate prefers)
        "gradient_accumulation_steps": trainer.accelerator.gradient_accumulation_steps,
    }
    if getattr(trainer, "llmstack_resumed_from", None) is not None:
        m["resumed_from_step"] = trainer.llmstack_resumed_from  # this run continued a killed or crashed one
    if trainer.is_fsdp_enabled:
        m["fsdp_version"] = trainer.accelerator.state.fsdp_plugin.fsdp_version
    for key in ("rewards/margins", "rewards/accuracies"):
        vals = [h[key] for h in history if key in h]
        if vals:
            m[key.replace("/", "_") + "_first"] = round(float(vals[0]), 5)
            m[key.replace("/", "_") + "_last"] = round(float(vals[-1]), 5)
    return m


def plot_curves(history: list[dict], out: Path, keys: tuple[str, ...]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(*zip(*points), marker="." if len(points) < 60 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = key.replace("/", "_") + ".png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def probe_answers(model_dir: Path, questions: list[str]) -> list[dict[str, Any]]:
    from llmstack.models import chat_greedy

    rows = []
    with whole_model_here():  # rank 0 alone answers: the saved (gathered) model, whole, even under ZeRO-3
        for q in questions:
            ans = chat_greedy(model_dir, q, max_new_tokens=48)
            rows.append({"question": q, "answer": ans["text"], "stopped_at_eos": ans["stopped_at_eos"]})
    return rows


def write_report(ctx, trainer, metrics: dict[str, Any], curve_keys: tuple[str, ...] = ("loss",),
                 probes: list[dict] | None = None) -> None:
    history = trainer.state.log_history
    (ctx.dir / "log_history.json").write_text(json.dumps(history, indent=1))
    images = plot_curves(history, ctx.dir, curve_keys)
    spec = ctx.spec
    adapter = "qlora" if spec.qlora else "lora" if spec.lora else "full fine-tune"
    lines = [f"## Training: {ctx.name} ({spec.type}, {adapter}, dataset `{spec.dataset}`)", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items() if not isinstance(v, (list, dict))]
    lines += [""] + [f"![{n}]({n})" for n in images]
    if probes:
        lines += ["", "| prompt | greedy answer |", "|---|---|"]
        lines += [f"| {p['question']} | {p['answer'].replace('|', '/').replace(chr(10), ' ')} |" for p in probes]
    lines.append(f"\nTensorBoard: `tensorboard --logdir {ctx.dir / 'runs'}`")
    (ctx.dir / "section.md").write_text("\n".join(lines) + "\n")


def finish(ctx, trainer, train_output, tokenizer, chat_template, curve_keys=("loss",)):
    """Save the model, write the report and return the StageResult every training stage returns."""
    from llmstack.stage import StageResult

    out = save_model(trainer, ctx, tokenizer, chat_template)
    metrics = metrics_from(trainer, train_output)
    if trainer.accelerator.is_main_process:
        merged = (out / "config.json").exists()
        probes = probe_answers(out, ctx.spec.probe) if ctx.spec.probe and merged else None
        if probes:
            metrics["probe"] = probes
        write_report(ctx, trainer, metrics, curve_keys, probes)
        cleanup_checkpoints(ctx)
        (ctx.dir / "result.json").write_text(json.dumps({"model": str(out), "metrics": metrics}, indent=2))
    return StageResult(outputs={"model": out}, metrics=metrics, model=out)
