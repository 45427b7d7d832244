"""Pipeline stage `distill`: on-policy distillation with TRL's DistillationTrainer — the student samples completions
to the dataset's prompts and learns the teacher's next-token distribution on its own samples (generalised JSD,
`args.beta`: 0 forward KL, 1 reverse KL), so it is corrected where it actually goes wrong.

The teacher (`teacher:` in the stage): a local model folder — typically a bigger model of the student's family
(SmolLM2-1.7B-Instruct teaching SmolLM2-135M-Instruct) — or an earlier stage of this recipe (its output model). It
must share the student's tokenizer: the loss compares distributions over one vocabulary, so a teacher with another
tokenizer would train on noise (TRL itself only compares vocabulary sizes). The recipe check compares the tokenizer
files (config/teacher.py); here both tokenizers are loaded and their vocabularies compared before anything trains.
For a teacher of another family, distil through data instead: a teacher source in data.datasets, then an sft stage.

Data: a `messages` dataset; the turns before the last assistant turn are the prompt (the answer is not used).
"""

from __future__ import annotations

from pathlib import Path

from llmstack.stage import StageContext, StageResult
from llmstack.train import checkpoints, loading, report, rewards, setup

DISTILL_DEFAULTS = {
    "max_completion_length": 128,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-5,
    "use_vllm": False,
}


def teacher_folder(ctx: StageContext) -> Path:
    """The teacher's model folder: an earlier stage's output (this run's), else the folder the recipe names."""
    name = ctx.spec.teacher
    if name in ctx.models:
        return Path(ctx.models[name])
    if any(s.id == name for s in ctx.recipe.stages):
        entry = ctx.run.entry(name) or {}
        path = (entry.get("outputs") or {}).get("model", {}).get("path")
        folder = Path(path) if path else ctx.run.dir / name / "model"
        if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
            raise FileNotFoundError(f"stage {ctx.name}: no model from stage '{name}' at {folder}; run that stage "
                                    f"first (`llmstack run <recipe> --only {name}`)")
        return folder
    return Path(name).expanduser()


def check_tokenizers(ctx: StageContext, teacher_tok, student_tok, teacher: Path) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise setup.recipe_error(
            ctx, "teacher",
            f"the teacher at {teacher} has another tokenizer than the student ({ctx.model}); on-policy distillation "
            f"compares next-token distributions over one vocabulary: pick a teacher of the student's model family, "
            f"or distil through data (a teacher source in data.datasets, then an sft stage)")


def run(ctx: StageContext) -> StageResult:
    import torch
    from datasets import load_from_disk
    from trl import DistillationTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    teacher_dir = teacher_folder(ctx)
    tokenizer = loading.load_tokenizer(ctx.model)
    check_tokenizers(ctx, loading.load_tokenizer(teacher_dir), tokenizer, teacher_dir)
    args = setup.trainer_config(ctx, DISTILL_DEFAULTS)
    if args.use_vllm and not torch.cuda.is_available():
        raise ValueError(f"stage {ctx.name}: args.use_vllm needs a CUDA GPU (TRL's vLLM generation); on this machine "
                         f"leave it false and generation runs through transformers")
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    data = data.map(rewards.to_prompt, remove_columns=data["train"].column_names).remove_columns("answer")
    model = loading.load_model(ctx.model, loading.weights_dtype(ctx), qlora=ctx.spec.qlora, scratch=ctx.dir)
    model.generation_config.eos_token_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
    teacher = loading.load_model(teacher_dir, loading.weights_dtype(ctx), scratch=ctx.dir).eval()

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=data["train"],
        eval_dataset=setup.eval_split(data, args),
        processing_class=tokenizer,
        peft_config=loading.peft_config(ctx.spec),
    )
    output = trainer.train(resume_from_checkpoint=checkpoints.resume_checkpoint(ctx, trainer))

    # ---- save -----------------------------------------------------------------------------------------------------
    return report.finish(ctx, trainer, output, tokenizer, tokenizer.chat_template, extra_metrics={
        "teacher": str(teacher_dir)}, curve_keys=("loss",))
