"""A training stage's report and result: metrics from the trainer's log, curves as PNGs, greedy answers to the
recipe's probe prompts, section.md, and `finish`, the last step every training stage shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmstack.train.checkpoints import cleanup_checkpoints
from llmstack.train.loading import whole_model_here
from llmstack.train.save import save_model


def precision(trainer) -> str:
    """What the stage trained in, as the device policy set it: the weights' dtype (by parameter count), the trainable
    parameters' where they differ (LoRA adapters in float32 over a bf16 base), and the autocast dtype if any."""
    counts: dict[str, int] = {}
    trainable = set()
    for p in trainer.model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + p.numel()
        if p.requires_grad:
            trainable.add(name)
    weights = max(counts, key=counts.get) if counts else "unknown"
    out = f"{weights} weights"
    if trainable and trainable != {weights}:
        out += f", {'/'.join(sorted(trainable))} trainable"
    autocast = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else None
    return out + (f", {autocast} autocast" if autocast else "")


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
        "device": trainer.args.device.type,
        "dtype": precision(trainer),
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


def finish(ctx, trainer, train_output, tokenizer=None, chat_template=None, curve_keys=("loss",),
           extra_metrics: dict[str, Any] | None = None, saved: Path | None = None, output: str = "model"):
    """The last step of every training stage: save the model (unless the stage saved its own: `saved`), add the
    stage's `extra_metrics` to the trainer's, answer the probe prompts, write the report, drop the checkpoints, and
    return the StageResult. `output` names the saved folder in the result: only a "model" becomes the next stage's
    model and is probed (the probes are a causal LM's chat answers); a "reward_model" scores, it does not answer."""
    from llmstack.stage import StageResult

    out = saved if saved is not None else save_model(trainer, ctx, tokenizer, chat_template)
    metrics = {**metrics_from(trainer, train_output), **(extra_metrics or {})}
    if trainer.accelerator.is_main_process:
        merged = (out / "config.json").exists()
        probes = probe_answers(out, ctx.spec.probe) if output == "model" and ctx.spec.probe and merged else None
        if probes:
            metrics["probe"] = probes
        write_report(ctx, trainer, metrics, curve_keys, probes)
        cleanup_checkpoints(ctx)
    return StageResult(outputs={output: out}, metrics=metrics, model=out if output == "model" else None)
