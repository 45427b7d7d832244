"""Pipeline stage `reward`: a reward model (Bradley-Terry, pairwise) on `prompt` / `chosen` / `rejected` conversations
with TRL's RewardTrainer.

The input model (ctx.model, e.g. the sft output) gets a one-output score head (AutoModelForSequenceClassification,
num_labels=1) and learns score(prompt+chosen) > score(prompt+rejected). The result is a merged sequence-classification
folder at <stage dir>/model, with the tokenizer beside it.

It is NOT the next policy model: the stage returns it under outputs["reward_model"] (hashed into the manifest) and
leaves StageResult.model unset, so the stage after it still trains the current policy. A grpo stage finds it with
`{type: reward_model, stage: <this stage's name>}`: it reads the manifest entry's outputs.reward_model.path
(see grpo.reward_model_path).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmstack.stage import StageContext, StageResult
from llmstack.train import common, rewards

REWARD_DEFAULTS = {
    "max_length": 1024,
    "learning_rate": 1e-5,
}


def load_reward_base(ctx: StageContext):
    """The input model with a fresh score head. An adapter-only input (lora.merge: false upstream) is merged first."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(ctx.model)
    if (folder / "adapter_config.json").exists():
        # common.load_model builds a causal LM; a score head needs a folder on disk, so merge the adapter into one.
        folder = common.merged_copy(folder, ctx.dir, ctx.recipe.model.dtype)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                              dtype=common._dtype(ctx.recipe.model.dtype))


def run(ctx: StageContext) -> StageResult:
    if ctx.spec.launch and not common.in_launched_process():
        launched = common.launch(ctx)
        return StageResult(outputs={"reward_model": launched.model}, metrics=launched.metrics)
    if ctx.spec.qlora:
        raise ValueError(f"stage {ctx.name}: qlora is not supported for reward models; use `lora`")
    from datasets import load_from_disk
    from transformers import set_seed
    from trl import RewardTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    args = common.trainer_config(ctx, REWARD_DEFAULTS)
    tokenizer = common.load_tokenizer(ctx.model)
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    first = data["train"][0]
    common.check_single_bos(tokenizer, tokenizer.apply_chat_template(first["prompt"] + first["chosen"], tokenize=False))
    set_seed(args.seed)  # the score head is initialised at random: seed it, as TRL does when it loads by name
    model = load_reward_base(ctx)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=common.eval_split(data, args),
        processing_class=tokenizer,
        peft_config=rewards.reward_peft_config(ctx.spec),
    )
    output = trainer.train(resume_from_checkpoint=common.resume_checkpoint(ctx, trainer))

    # ---- save: always a merged folder, so grpo / eval load it with AutoModelForSequenceClassification alone ---------
    out = ctx.dir / "model"
    model = trainer.model
    if ctx.spec.lora:
        model = trainer.accelerator.unwrap_model(model).merge_and_unload()
    if trainer.accelerator.is_main_process:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()

    # ---- report ---------------------------------------------------------------------------------------------------
    metrics = common.metrics_from(trainer, output)
    history = trainer.state.log_history
    train_acc = [h["accuracy"] for h in history if "accuracy" in h]
    if train_acc:
        metrics["train_accuracy_first"] = round(float(train_acc[0]), 4)
        metrics["train_accuracy_last"] = round(float(train_acc[-1]), 4)
    if trainer.accelerator.is_main_process:
        validation = data.get("validation")
        if validation is not None and len(validation):
            metrics["val_pairwise_accuracy"] = round(rewards.pairwise_accuracy(out, validation), 4)
            metrics["val_pairs"] = len(validation)
        common.write_report(ctx, trainer, metrics, curve_keys=("loss", "accuracy", "margin"))
        common.cleanup_checkpoints(ctx)
        (ctx.dir / "result.json").write_text(json.dumps({"model": str(out), "metrics": metrics}, indent=2))
    return StageResult(outputs={"reward_model": out}, metrics=metrics)
