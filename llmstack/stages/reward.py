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

from pathlib import Path

from llmstack.stage import StageContext, StageResult
from llmstack.train import checkpoints, loading, report, rewards, setup, templates

REWARD_DEFAULTS = {
    "max_length": 1024,
    "learning_rate": 1e-5,
}


def load_reward_base(ctx: StageContext):
    """The input model with a fresh score head. An adapter-only input (lora.merge: false upstream) is merged first."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(ctx.model)
    if (folder / "adapter_config.json").exists():
        # loading.load_model builds a causal LM; a score head needs a folder on disk, so merge the adapter into one.
        folder = loading.merged_copy(folder, ctx.dir, loading.save_dtype(ctx))
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                              dtype=loading.torch_dtype(loading.weights_dtype(ctx)))


def run(ctx: StageContext) -> StageResult:
    if ctx.spec.qlora:
        raise ValueError(f"stage {ctx.name}: qlora is not supported for reward models; use `lora`")
    from datasets import load_from_disk
    from transformers import set_seed
    from trl import RewardTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    args = setup.trainer_config(ctx, REWARD_DEFAULTS)
    tokenizer = loading.load_tokenizer(ctx.model)
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    first = data["train"][0]
    rendered = tokenizer.apply_chat_template(first["prompt"] + first["chosen"], tokenize=False)
    templates.check_single_bos(tokenizer, rendered)
    set_seed(args.seed)  # the score head is initialised at random: seed it, as TRL does when it loads by name
    model = load_reward_base(ctx)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=setup.eval_split(data, args),
        processing_class=tokenizer,
        peft_config=rewards.reward_peft_config(ctx.spec),
    )
    output = trainer.train(resume_from_checkpoint=checkpoints.resume_checkpoint(ctx, trainer))

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
    accuracy = {}
    train_acc = [h["accuracy"] for h in trainer.state.log_history if "accuracy" in h]
    if train_acc:
        accuracy["train_accuracy_first"] = round(float(train_acc[0]), 4)
        accuracy["train_accuracy_last"] = round(float(train_acc[-1]), 4)
    validation = data.get("validation")
    if trainer.accelerator.is_main_process and validation is not None and len(validation):
        accuracy["val_pairwise_accuracy"] = round(rewards.pairwise_accuracy(out, validation), 4)
        accuracy["val_pairs"] = len(validation)
    return report.finish(ctx, trainer, output, saved=out, output="reward_model", extra_metrics=accuracy,
                         curve_keys=("loss", "accuracy", "margin"))
