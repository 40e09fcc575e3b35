"""Fine-tune a MiniGPT checkpoint (or any causal LM folder) with transformers' `Trainer`.

Trainer owns the loop, the optimizer, mixed precision, accumulation, evaluation, checkpoints and resume. This script
holds the story: check the arguments, load the model and tokenizer, build the data, train, evaluate, save, push. The
data pipeline is finetune_data.py (the pair template and its masking: pairs.py), LoRA is lora.py, the Trainer
callbacks and the label-smoothed loss are callbacks.py, and the run record summary.py.

Two modes:
  causal      plain text (.txt, one document per blank-line-separated paragraph, or .jsonl with --text_field),
              packed into --max_length blocks (or one padded row per document with --packing false) and trained
              with CausalCollator: every token is a target, EOS included; only padding positions are masked.
  supervised  .jsonl pairs. Each row becomes
                  [BOS] prompt_template with {prompt} = row[prompt_field], + separator | row[answer_field] EOS
              with labels -100 on everything left of the bar (and on padding), so only the answer and its EOS
              are learned. The template is saved as `prompt_template.json` in the output folder, where
              evaluation.py and the model card (minigpt/hub/model_card.py) pick it up. The saved tokenizer adds
              the BOS by itself (`tokenizer(text)`, as a `pipeline` calls it), and generation_config.json
              decodes greedily, so the model gets by default what it was trained on.

--threads sets torch's CPU threads (threads.py; the default suits a shared machine). Unless --logging_steps is given
(on the command line or in the config file), the loss is logged about 20 times per run; see adjust_defaults.

Arguments are our three dataclasses below plus transformers.TrainingArguments, parsed by HfArgumentParser from
the command line, from a YAML/JSON file, or both (`finetune.py config.yaml --learning_rate 1e-4`):

    python -m minigpt.train.finetune --model_name_or_path runs/pretrain --mode supervised \
        --train_file minigpt/train/examples/en_fr.jsonl --output_dir runs/en_fr --max_steps 300
    accelerate launch -m minigpt.train.finetune config.yaml

The output folder is a complete checkpoint (weights, config with auto_map and the modeling files, tokenizer,
generation config), and so is every intermediate checkpoint-N folder.
"""

import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import AutoModelForCausalLM, EarlyStoppingCallback, HfArgumentParser, Trainer, TrainingArguments, set_seed

import modeling_minigpt  # noqa: F401  (registers MiniGPT with the Auto classes)
from minigpt.commands import command, one_line_usage, run_cli
from minigpt.folders import enable_cache, load_pretrained
from minigpt.sources import PushRefused, adapter_base, check_model_path, push_problem
from minigpt.train.args import read_arguments
from minigpt.train.chat import add_chat_template, pairs_chat_template
from minigpt.train.callbacks import (
    KeepUseCacheCallback,
    SaveTemplateCallback,
    StopOnSignalCallback,
    causal_label_smoothing,
)
from minigpt.train.finetune_data import CausalCollator, DataArguments, build_datasets, check_data_args, template_of
from minigpt.train.lora import DEFAULT_LORA_TARGETS, apply_lora, load_adapter
from minigpt.train.metrics import load_metric
from minigpt.train.pairs import SupervisedCollator
from minigpt.train.summary import finetune_summary, write_summary
from minigpt.train.threads import THREADS_HELP, set_threads
from minigpt.train.tokenizer import (
    add_bos_by_default,
    check_vocab,
    context_length,
    load_tokenizer,
    special_token_ids,
    tokenizer_source,
)

logger = logging.getLogger("minigpt.train.finetune")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder to start from (model + tokenizer): minigpt-pretrain's output, a folder "
                  "converted from GPT-2 by minigpt-convert-gpt2, any causal LM folder or Hub id, or a LoRA adapter "
                  "folder (<output_dir>/adapter of a --lora run), whose training then continues."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder, if it is not the model folder."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the modeling code stored in a non-MiniGPT checkpoint folder."}
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all the weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale numerator (the update is alpha / r * B A)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGETS,
        metadata={"help": "Comma-separated module names to adapt, or 'all-linear' (every Linear but the LM head). "
                  "MiniGPT's are qkv_proj, o_proj (attention) and up_proj, down_proj (MLP)."},
    )
    merge_lora: bool = field(
        default=True,
        metadata={"help": "Save the merged model in output_dir (the adapter alone goes to output_dir/adapter)."},
    )


@dataclass
class ExtraArguments:
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement (needs evaluation, "
                                "--load_best_model_at_end and save/eval on the same steps)."}
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "The least change of the metric that counts as an improvement."}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, ExtraArguments, TrainingArguments)


def parse_args(argv: list[str] | None = None):
    """(model, data, extra, training arguments, the names the user set): the command line, or a YAML/JSON file as the
    first argument with command-line overrides after it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argv.pop(0) if argv and argv[0].endswith((".yaml", ".yml", ".json")) else None
    given = set()
    parser = one_line_usage(HfArgumentParser(ARGUMENT_CLASSES), "finetune")
    return (*read_arguments(parser, argv, config, given), given)


def main(argv: list[str] | None = None) -> Trainer:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, extra_args, training_args, given = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    kind, base_model, push_to_hub = check_arguments(model_args, data_args, training_args)  # before anything loads
    set_seed(training_args.seed)
    threads = set_threads(extra_args.threads, on_cpu=training_args.device.type == "cpu")
    logger.info("torch threads: %d (--threads)", threads)

    model, tokenizer, max_length = load_model_and_tokenizer(model_args, data_args, kind, base_model)
    with training_args.main_process_first(desc="tokenizing"):
        train_set, eval_set = build_datasets(data_args, tokenizer, max_length, training_args.seed)
    if training_args.eval_strategy != "no" and eval_set is None:
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy} needs held-out data: pass --validation_file or "
            "--validation_split_percentage."
        )
    # both mask padding by position, so EOS stays a target even where the tokenizer pads with it
    collator = CausalCollator(tokenizer) if data_args.mode == "causal" else SupervisedCollator(tokenizer.pad_token_id)
    if model_args.lora and kind != "adapter":
        model = apply_lora(model, model_args.lora_target_modules, model_args.lora_r, model_args.lora_alpha,
                           model_args.lora_dropout)
        if training_args.gradient_checkpointing:  # frozen embeddings: checkpointed blocks need an input with grad
            model.enable_input_require_grads()

    stop_on_signal = StopOnSignalCallback()
    callbacks = [KeepUseCacheCallback(), stop_on_signal]
    if data_args.mode == "supervised":
        callbacks.append(SaveTemplateCallback(template_of(data_args)))
    if extra_args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(extra_args.early_stopping_patience,
                                               extra_args.early_stopping_threshold))
    batches_per_epoch = math.ceil(len(train_set) / training_args.train_batch_size / max(1, training_args.world_size))
    for note in adjust_defaults(training_args, given, batches_per_epoch):
        logger.info(note)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        compute_loss_func=causal_label_smoothing(training_args.label_smoothing_factor),
    )
    log_plan(trainer, train_set, data_args, max_length, batches_per_epoch)

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the newest checkpoint-N in output_dir
    try:
        with stop_on_signal.stop.installed():
            result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(trainer, argv)) from None
    if stop_on_signal.stop.signal is not None:  # stopped after saving this step: no final model, as pretraining
        raise KeyboardInterrupt(interrupted_message(trainer, argv))
    trainer.log_metrics("train", result.metrics)

    if eval_set is not None:
        metrics = trainer.evaluate()
        # eval_loss is already a mean over tokens: one "token" carrying it gives exp(eval_loss)
        perplexity = load_metric("perplexity").compute(nll=[metrics["eval_loss"]], num_tokens=[1])
        metrics["eval_perplexity"] = perplexity["perplexity"]
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    save_final(trainer, tokenizer, model_args, data_args, training_args.output_dir, base_model)
    if push_to_hub and trainer.is_world_process_zero():
        from minigpt.hub.push import push_folder  # only now: pushing is optional and needs huggingface_hub set up

        push_folder(
            training_args.output_dir,
            training_args.hub_model_id,
            private=bool(training_args.hub_private_repo),
            commit_message=f"Fine-tune ({data_args.mode}) on {Path(data_args.train_file).name}",
        )
    return trainer


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Every check that needs no model or tokenizer, before either loads; returns (what --model_name_or_path is:
    "model", "hub" or "adapter", the base model to load, whether to push at the end)."""
    if model_args.model_name_or_path is None:
        raise ValueError("No --model_name_or_path; pass a checkpoint folder (model + tokenizer) to start from.")
    check_data_args(data_args)
    kind = check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    base_model = adapter_base(model_args.model_name_or_path) if kind == "adapter" else model_args.model_name_or_path
    if kind == "adapter" and model_args.lora:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path} is a LoRA adapter and --lora adds a new one on "
            f"top of it. Drop --lora to continue training this adapter, or pass its base model ({base_model}) or "
            "the merged model with --lora to train a fresh one."
        )
    if training_args.ddp_find_unused_parameters is None:  # every parameter takes part in every forward
        training_args.ddp_find_unused_parameters = False
    # Hub pushes go through minigpt.hub.push at the end, not through Trainer (which would create the repo at start-up).
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and (problem := push_problem(training_args.hub_model_id)):
        raise PushRefused(problem)
    return kind, base_model, push_to_hub


def load_model_and_tokenizer(model_args: ModelArguments, data_args: DataArguments, kind: str, base_model: str):
    """(model, tokenizer, max_length): the model (an adapter on its base, to train further), its tokenizer, and the
    generation defaults the fine-tune will save: stop at EOS, pad with the tokenizer's pad id; for conversations a
    chat template (minigpt/train/chat.py) whose end-of-turn token also stops generation; for supervised pairs BOS
    added by the tokenizer, greedy decoding and the prompt format as a chat template, so the model gets by default
    what it was trained on."""
    tokenizer_path = tokenizer_source(model_args.model_name_or_path, model_args.tokenizer_name_or_path, kind)
    tokenizer = load_tokenizer(tokenizer_path, option="--tokenizer_name_or_path")
    model = load_pretrained(AutoModelForCausalLM, base_model, trust_remote_code=model_args.trust_remote_code)
    if kind == "adapter":
        model = load_adapter(model, model_args.model_name_or_path)
        model_args.lora = True  # saved as a --lora run: the adapter in output_dir/adapter, the merged model beside it
    check_vocab(tokenizer, model)
    context = context_length(model, tokenizer)
    max_length = data_args.max_length or context
    if max_length is None:
        raise ValueError("Neither the model config nor the tokenizer gives a context length; pass --max_length.")
    if context is not None and max_length > context:
        raise ValueError(f"--max_length {max_length} exceeds the model's context of {context} tokens; lower it.")
    model.generation_config.update(**special_token_ids(tokenizer))
    if data_args.mode == "chat":  # a ChatML template where there is none; answers end at its end-of-turn token too
        model.generation_config.update(eos_token_id=add_chat_template(model, tokenizer))
    if data_args.mode == "supervised":
        if data_args.add_bos:
            add_bos_by_default(tokenizer)
        if tokenizer.chat_template is None:  # chat clients then prompt the model as it was trained
            template = template_of(data_args)
            tokenizer.chat_template = pairs_chat_template(template.prompt_template, template.separator,
                                                          template.add_bos)  # fmt: skip
        model.generation_config.update(do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None,
                                       repetition_penalty=None)
    return model, tokenizer, max_length


def interrupted_message(trainer: Trainer, argv: list[str]) -> str:
    """What Ctrl-C ends a run with: the step reached, the newest complete checkpoint-N and the command that continues
    from it (this run's arguments, --resume_from_checkpoint replaced)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    out = Path(trainer.args.output_dir)
    # trainer_state.json is the last file Trainer writes into checkpoint-N: a folder without it is a save cut short
    saved = [(int(p.name.rsplit("-", 1)[1]), p) for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    step = f"at step {trainer.state.global_step}"
    if not saved:
        return f"{step}; no checkpoint was saved yet (--save_steps sets how often one is), so a rerun starts over."
    last = max(saved)[1]
    args, skip = [], False
    for arg in argv:  # drop an earlier --resume_from_checkpoint (and its value)
        if skip or arg.startswith("--resume_from_checkpoint"):
            skip = arg == "--resume_from_checkpoint" and not skip
            continue
        args.append(arg)
    again = f"{command('minigpt.train.finetune')} {shlex.join([*args, '--resume_from_checkpoint', str(last)])}"
    return f"{step}; the last checkpoint is {last}; continue with: {again}"


def adjust_defaults(args: TrainingArguments, given: set[str], batches_per_epoch: int) -> list[str]:
    """Replace TrainingArguments defaults that do not suit a short fine-tune, and only defaults: an argument in `given`
    (set on the command line or in the config file, even to the default's value) is never changed. Returns one line
    per change, for the log.

    - logging_steps (default 500): more than a short fine-tune runs, so nothing showed before the end; log about 20
      times per run instead (every 1 to 50 steps). eval_steps, which TrainingArguments sets to logging_steps when
      it is not given, follows, unless that would break save_steps being a multiple of it (load_best_model_at_end).
    - include_num_input_tokens_seen (default "no"): "non_padding", so that the model card can give the tokens the
      model read (trainer_state.json's num_input_tokens_seen).
    The others finetune touches keep an explicit value by construction: --threads (None = the default),
    ddp_find_unused_parameters (None = not given) and push_to_hub (done by minigpt.hub.push instead of Trainer).
    """
    notes = []
    if "logging_steps" not in given and args.logging_strategy == "steps":
        steps_per_epoch = max(1, batches_per_epoch // max(1, args.gradient_accumulation_steps))
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        old, args.logging_steps = args.logging_steps, max(1, min(50, total // 20))
        notes.append(f"logging the loss every {args.logging_steps} steps of {total} (--logging_steps sets it; "
                     f"Trainer's default is every {old:g})")
        follows = not (args.load_best_model_at_end and args.save_strategy == "steps"
                       and args.save_steps % args.logging_steps)  # fmt: skip
        if "eval_steps" not in given and args.eval_strategy == "steps" and args.eval_steps == old and follows:
            args.eval_steps = args.logging_steps
            notes.append(f"evaluating every {args.eval_steps} steps (--eval_steps follows --logging_steps)")
    if "include_num_input_tokens_seen" not in given and args.include_num_input_tokens_seen == "no":
        args.include_num_input_tokens_seen = "non_padding"
    return notes


def log_plan(trainer: Trainer, train_set: datasets.Dataset, data_args: DataArguments, max_length: int,
             batches_per_epoch: int):
    """The derived numbers, printed before the first step. A training row is what a batch holds one of: a
    prompt/answer pair, a document (causal, --packing false), or a block of up to max_length tokens cut from the
    EOS-separated stream of all documents (causal, packed), so the row count says nothing of the documents there."""
    args = trainer.args
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens = sum(len(ids) for ids in train_set["input_ids"])
    if data_args.mode == "supervised":
        data, unit = f"{len(train_set):,} prompt/answer pairs, one row each, {tokens:,} tokens", "pairs"
    elif data_args.mode == "chat":
        data, unit = f"{len(train_set):,} conversations, one row each, {tokens:,} tokens", "conversations"
    elif data_args.packing:
        eos = trainer.processing_class.eos_token_id
        documents = sum(ids.count(eos) for ids in train_set["input_ids"])
        data = (f"{documents:,} documents, {tokens:,} tokens with an EOS after each, packed into {len(train_set):,} "
                f"blocks of {max_length} tokens (the last may be shorter)")
        unit = "blocks"
    else:
        data = f"{len(train_set):,} documents, one row each (cut at max_length {max_length}), {tokens:,} tokens"
        unit = "documents"
    logger.info(
        "training data: %s; %d per device x %d accumulation x %d processes = %d %s per optimizer step, %d steps "
        "per epoch; trainable parameters: %d",
        data, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size, rows_per_step,
        unit, max(1, batches_per_epoch // args.gradient_accumulation_steps),  # as Trainer counts them
        sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    )


def save_final(trainer: Trainer, tokenizer, model_args: ModelArguments, data_args: DataArguments, output_dir: str,
               base_model: str | None = None):
    """Write the complete checkpoint: weights, config + modeling files (auto_map), tokenizer, generation config,
    and the prompt template in supervised mode. A LoRA run keeps its adapter in output_dir/adapter."""
    model = trainer.model
    if model_args.lora:
        trainer.save_model(os.path.join(output_dir, "adapter"))
        if not model_args.merge_lora:
            return
        model = model.merge_and_unload()
    if trainer.is_world_process_zero():
        # save_pretrained copies the modeling files because MiniGPT registers itself with register_for_auto_class
        model.save_pretrained(output_dir)
        enable_cache(Path(output_dir))  # training may have switched the cache off; the checkpoint is for inference
        tokenizer.save_pretrained(output_dir)
        if data_args.mode == "supervised":
            template_of(data_args).save(output_dir)
        trainer.save_state()
        data = f"{Path(data_args.train_file).name} ({data_args.mode} fine-tuning)"
        write_summary(output_dir, finetune_summary(trainer, data, base_model))
        logger.info("Saved the fine-tuned checkpoint to %s", output_dir)


def cli(argv: list[str] | None = None) -> None:
    """The `minigpt-finetune` console script: bad input is one line naming the fix, Ctrl-C one line with where the run
    got to and how to continue it."""
    transformers.utils.logging.set_verbosity_warning()
    run_cli("finetune", main, argv, not_started=" before training started; nothing was saved")


if __name__ == "__main__":
    cli()
