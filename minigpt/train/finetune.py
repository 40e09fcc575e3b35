"""Fine-tune a MiniGPT checkpoint (or any causal LM folder) with transformers' `Trainer`.

Trainer owns the loop, the optimizer, mixed precision, accumulation, evaluation, checkpoints and resume. This file
owns what is specific to the data: reading it (minigpt/train/data.py's reader), tokenizing and collating it. The
prompt template, the label masking of pairs and their collator are in pairs.py, shared with evaluation.py.

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

import contextlib
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from transformers.trainer_pt_utils import LabelSmoother

import modeling_minigpt  # noqa: F401  (registers MiniGPT with the Auto classes)
from minigpt.commands import command, interrupted, one_line
from minigpt.train.checkpoints import load_pretrained
from minigpt.train.data import read_rows
from minigpt.train.metrics import load_metric
from minigpt.train.monitoring import describe_hardware
from minigpt.train.pairs import (
    ESCAPES_HELP,
    PromptTemplate,
    SupervisedCollator,
    encode_pair,
    text_field_error,
    unescape,
)
from minigpt.train.sources import adapter_base, check_model_path
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

DEFAULT_LORA_TARGETS = "qkv_proj,o_proj,up_proj,down_proj"


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
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": ".txt or .jsonl (causal), .jsonl (supervised)."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out file in the same format."})
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "Percent of train_file held out for evaluation when no validation_file."}
    )
    mode: str = field(default="causal", metadata={"help": "causal (plain text) or supervised (prompt/answer pairs)."})
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens per training row (the block size when packing); default: the "
                                "model's context (n_positions)."}
    )
    text_field: str = field(default="text", metadata={"help": "causal .jsonl: the field holding the text."})
    packing: bool = field(
        default=True, metadata={"help": "causal: concatenate documents (EOS between) into full blocks; "
                                "false: one row per document, truncated and padded."}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "supervised: the field holding the prompt."})
    answer_field: str = field(default="answer", metadata={"help": "supervised: the field holding the answer."})
    prompt_template: str = field(
        default="{prompt}",
        metadata={"help": "supervised: how a prompt is written, must contain {prompt}. " + ESCAPES_HELP},
    )
    separator: str = field(
        default="\n", metadata={"help": "supervised: text between prompt and answer. It ends the prompt (prompt and "
                                "answer are tokenized apart), so prefer a newline or ':' to a trailing space. "
                                + ESCAPES_HELP}
    )
    add_bos: bool = field(
        default=True, metadata={"help": "supervised: start each row with the BOS token; the saved tokenizer then adds "
                                "it to every text it encodes (add_special_tokens=False leaves it out)."}
    )
    truncation: str = field(
        default="left",
        metadata={"help": "supervised, for a row longer than max_length: 'left' drops the start of the prompt "
                  "(with a warning), 'error' refuses."},
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


# ---------------------------------------------------------------------------------------------------------------
# Data: reading, tokenizing and collating (the pair template and its label masking are in minigpt/train/pairs.py)
# ---------------------------------------------------------------------------------------------------------------


def template_of(args: DataArguments) -> PromptTemplate:
    return PromptTemplate(args.prompt_template, args.separator, args.add_bos)


@dataclass
class CausalCollator(DataCollatorWithPadding):
    """Pads a batch of causal rows (transformers' DataCollatorWithPadding) and makes every real token a target:
    labels are the input ids, -100 where attention_mask is 0.

    Padding is masked by position, not by id. DataCollatorForLanguageModeling masks every label equal to
    pad_token_id, and a tokenizer without a pad token (every GPT-2-style one) pads with EOS: every EOS, the one that
    ends a document too, would then be masked, and the model would never learn to stop.
    """

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{"input_ids": r["input_ids"]} for r in rows])  # input_ids, attention_mask (B, T)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


class SaveTemplateCallback(TrainerCallback):
    """Copies the prompt template into every checkpoint-N folder, so that each one evaluates on its own."""

    def __init__(self, template: PromptTemplate):
        self.template = template

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.template.save(folder)


class StopOnSignalCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM finishes the current optimizer step, saves a checkpoint-N and stops, as pretraining
    does, so an interrupted fine-tune loses nothing; a second signal interrupts at once. `install` while training."""

    def __init__(self):
        self.signal = None

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal = signum

    @contextlib.contextmanager
    def install(self):
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:  # after DefaultFlowCallback, so whatever --save_strategy says, this step saves
            control.should_save = control.should_training_stop = True


class KeepUseCacheCallback(TrainerCallback):
    """Writes `use_cache: true` back into every checkpoint-N/config.json. Gradient checkpointing (and TRL's
    trainers) switch model.config.use_cache off while training, and Trainer saves the config as it finds it; a
    checkpoint saved so would make generate() run without a cache and torch.export/ExecuTorch recipes refuse it
    ("The model must have caching enabled"). The file is edited rather than the live config, so training itself is
    left as Trainer set it up."""

    def on_save(self, args, state, control, **kwargs):
        config = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "config.json"
        if state.is_world_process_zero and config.is_file():
            enable_cache_in(config)


def enable_cache_in(config_file: Path):
    """Set use_cache to true in a saved config.json (no-op when it already is)."""
    fields = json.loads(config_file.read_text())
    if fields.get("use_cache") is not True:
        fields["use_cache"] = True
        config_file.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def check_data_file(path: str, mode: str, option: str = "--train_file") -> None:
    """Refuse, before anything is loaded, a data file that does not exist, is a folder or has a suffix this mode
    cannot read."""
    wanted = ".txt, .jsonl or .json" if mode == "causal" else ".jsonl or .json with prompt and answer fields"
    if Path(path).is_dir():
        raise IsADirectoryError(
            f"{option} {path} is a folder; fine-tuning takes one {wanted} file (minigpt-pretrain is the one that "
            "reads folders)."
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path}: no such file; pass an existing {wanted} file.")
    suffix = Path(path).suffix
    if not ((suffix == ".txt" and mode == "causal") or suffix in (".jsonl", ".json")):
        raise ValueError(f"{path}: cannot read a {suffix or 'suffix-less'} file in {mode} mode; pass a {wanted} file.")


def load_rows(path: str, mode: str, option: str = "--train_file") -> datasets.Dataset:
    """Read a data file into a Dataset: .txt -> one row per paragraph in `text`, .jsonl/.json -> one per record."""
    check_data_file(path, mode, option)
    return read_rows(path, text_unit="paragraph")


def tokenize_supervised(rows: datasets.Dataset, tokenizer, template: PromptTemplate, args: DataArguments,
                        max_length: int, name: str) -> datasets.Dataset:
    for key in (args.prompt_field, args.answer_field):
        if key not in rows.column_names:
            raise ValueError(
                f"{name} has no field {key!r}; its fields are {rows.column_names}. Name the prompt and answer fields "
                "with --prompt_field and --answer_field."
            )

    def encode(batch, indices):
        out = {"input_ids": [], "labels": [], "truncated": []}
        for i, prompt, answer in zip(indices, batch[args.prompt_field], batch[args.answer_field]):
            ids, labels, truncated = encode_pair(
                tokenizer, template, prompt, answer, max_length, args.truncation, row=f"{i + 1} of {name}"
            )
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(truncated)
        return out

    encoded = rows.map(encode, batched=True, with_indices=True, remove_columns=rows.column_names)
    truncated = sum(encoded["truncated"])
    if truncated:
        logger.warning(
            "%d of %d rows of %s were longer than max_length=%d; their prompts lost tokens on the left.",
            truncated, len(encoded), name, max_length,
        )
    return encoded.remove_columns("truncated")


def tokenize_causal(rows: datasets.Dataset, tokenizer, args: DataArguments, max_length: int, name: str):
    if args.text_field not in rows.column_names:
        raise text_field_error(name, args.text_field, rows.column_names, "--mode supervised", args)
    eos = tokenizer.eos_token_id

    def encode(batch):
        docs = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in batch[args.text_field] if t.strip()]
        if not args.packing:
            return {"input_ids": [d[:max_length] for d in docs]}
        # pack: one stream of documents separated by EOS, cut into max_length blocks (the tail block is shorter)
        stream = [t for d in docs for t in d]
        return {"input_ids": [stream[i : i + max_length] for i in range(0, len(stream), max_length)]}

    encoded = rows.map(encode, batched=True, batch_size=10_000, remove_columns=rows.column_names)
    if len(encoded) == 0:
        raise ValueError(f"{name} holds no text; fill the file or pick the right --text_field.")
    return encoded


def check_data_args(args: DataArguments) -> None:
    """Every data argument that can be checked without the model or the tokenizer, checked before either loads.
    The template options take the escapes \\n, \\t and \\\\ (see ESCAPES_HELP): they are turned into the characters here."""
    if args.mode not in ("causal", "supervised"):
        raise ValueError(f"--mode {args.mode!r} is unknown; use causal (plain text) or supervised (pairs).")
    if args.truncation not in ("left", "error"):
        raise ValueError(f"--truncation {args.truncation!r} is unknown; use left or error.")
    if args.train_file is None:
        raise ValueError("No --train_file; pass the text (causal) or the .jsonl pairs (supervised) to train on.")
    check_data_file(args.train_file, args.mode, "--train_file")
    if args.validation_file:
        check_data_file(args.validation_file, args.mode, "--validation_file")
    args.prompt_template, args.separator = unescape(args.prompt_template), unescape(args.separator)
    template_of(args)  # a template without {prompt} is refused now


def build_datasets(args: DataArguments, tokenizer, max_length: int, seed: int):
    """(train, eval or None), tokenized: rows of input_ids (and labels in supervised mode)."""
    train_rows = load_rows(args.train_file, args.mode)
    eval_rows = load_rows(args.validation_file, args.mode, "--validation_file") if args.validation_file else None
    if eval_rows is None and args.validation_split_percentage > 0:
        split = train_rows.train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
        train_rows, eval_rows = split["train"], split["test"]

    def tokenize(rows, name):
        if args.mode == "causal":
            return tokenize_causal(rows, tokenizer, args, max_length, name)
        return tokenize_supervised(rows, tokenizer, template_of(args), args, max_length, name)

    train = tokenize(train_rows, args.train_file)
    evaluation = tokenize(eval_rows, args.validation_file or "the validation split") if eval_rows else None
    return train, evaluation


# ---------------------------------------------------------------------------------------------------------------
# Model: LoRA
# ---------------------------------------------------------------------------------------------------------------


def tied_output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head when it shares its weight with the token embeddings (MiniGPT's lm_head by default), else None."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    return head if tied else None


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the Linear layers LoRA may adapt, the names target_modules match against. A tied
    LM head is left out: it is the embedding matrix, and an adapter on it would be a second, untied head that
    merge_and_unload folds into the embeddings (peft's "all-linear" leaves it out for the same reason)."""
    head = tied_output_layer(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})  # fmt: skip


def apply_lora(model, target_modules: str | list[str] = DEFAULT_LORA_TARGETS, r: int = 8, alpha: int = 16,
               dropout: float = 0.0):
    """Wrap `model` in a peft LoRA model. Every target name must match a module: peft alone only fails when none
    does, so a typo among several names would silently leave that layer untrained. The tied LM head is refused."""
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if target_modules != "all-linear":
        head = tied_output_layer(model)
        tied = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if head is not None and m is head}
        names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()} - tied
        missing = [t for t in target_modules if t not in names]
        if missing or not target_modules:
            why = ""
            if tied & set(missing):
                why = f" ({', '.join(sorted(tied))} is the LM head, tied to the token embeddings)"
            raise ValueError(
                f"LoRA target modules {missing or target_modules} match no module of {type(model).__name__} that "
                f"LoRA can adapt{why}. Its linear layers are {linear_module_names(model)}; list some of those, or "
                "pass 'all-linear'."
            )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft (0.21.2, the newest) reads model.is_gradient_checkpointing in PeftModel.__init__, a property that
        # transformers 5.24 deprecates with a FutureWarning on every LoRA run. Nothing on our side calls it; drop
        # this filter once peft reads is_activation_checkpointing.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def load_adapter(model, adapter: str):
    """`model` (the adapter's base) with the LoRA adapter of folder `adapter` loaded to train further.

    A fine-tune started from an adapter folder continues to train that adapter, as peft users expect of
    PeftModel.from_pretrained(base, adapter, is_trainable=True). Not AutoModelForCausalLM.from_pretrained(adapter):
    transformers (with peft installed) does load an adapter folder that way, base and all, but for inference, with
    every weight frozen, so Trainer would train nothing ("element 0 of tensors does not require grad")."""
    from peft import PeftModel

    with warnings.catch_warnings():  # the same peft FutureWarning as in apply_lora
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    logger.info("continuing to train the LoRA adapter %s (its r, alpha and targets; the --lora_* options are unused)",
                adapter)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Arguments and main
# ---------------------------------------------------------------------------------------------------------------

ARGUMENT_CLASSES = (ModelArguments, DataArguments, ExtraArguments, TrainingArguments)


def parse_args(argv: list[str] | None = None):
    """Command line, or a YAML/JSON file as the first argument with command-line overrides after it."""
    from minigpt.train.args import read_arguments  # the one way both training scripts read a config file

    argv = list(sys.argv[1:] if argv is None else argv)
    config = argv.pop(0) if is_config_file(argv) else None
    return read_arguments(HfArgumentParser(ARGUMENT_CLASSES), argv, config)


def is_config_file(argv: list[str]) -> bool:
    return bool(argv) and argv[0].endswith((".yaml", ".yml", ".json"))


def given_arguments(argv: list[str]) -> set[str]:
    """The names of the arguments the user set, in the config file (non-null values) or on the command line, whatever
    their value: `logging_steps: 500` in a file is a choice, not TrainingArguments' default, and must be kept."""
    argv = list(argv)
    given = set()
    if is_config_file(argv):
        config = Path(argv.pop(0)).expanduser()  # read_arguments has parsed and checked it already
        given |= {key for key, value in (yaml.safe_load(config.read_text()) or {}).items() if value is not None}
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    unset = object()  # not a string, so argparse leaves it as it is; whatever the command line names replaces it
    parser.set_defaults(**{action.dest: unset for action in parser._actions if action.dest != "help"})
    namespace, _ = parser.parse_known_args(argv)
    return given | {name for name, value in vars(namespace).items() if value is not unset}


def main(argv: list[str] | None = None) -> Trainer:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, extra_args, training_args = parse_args(argv)
    given = given_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logger.setLevel(logging.WARNING)
    if model_args.model_name_or_path is None:
        raise ValueError("No --model_name_or_path; pass a checkpoint folder (model + tokenizer) to start from.")
    check_data_args(data_args)  # bad arguments fail before anything loads
    kind = check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    base_model = adapter_base(model_args.model_name_or_path) if kind == "adapter" else model_args.model_name_or_path
    if kind == "adapter" and model_args.lora:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path} is a LoRA adapter and --lora adds a new one on "
            f"top of it. Drop --lora to continue training this adapter, or pass its base model ({base_model}) or "
            "the merged model with --lora to train a fresh one."
        )
    set_seed(training_args.seed)
    threads = set_threads(extra_args.threads, on_cpu=training_args.device.type == "cpu")
    logger.info("torch threads: %d (--threads)", threads)

    if training_args.ddp_find_unused_parameters is None:  # every parameter takes part in every forward
        training_args.ddp_find_unused_parameters = False
    # Hub pushes go through minigpt.hub.push at the end, not through Trainer (which would create the repo at start-up).
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    if push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/minigpt-en-fr).")
    if push_to_hub:  # what push_folder would refuse after the whole run, refused before it
        from minigpt.hub.push import hub_access_problem

        if problem := hub_access_problem():
            raise PermissionError(f"--push_to_hub: {problem}; or drop --push_to_hub and publish the finished folder "
                                  "with minigpt-push OUTPUT_DIR REPO_ID.")  # fmt: skip

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
    # generate() reads these from generation_config.json: stop at EOS, pad with the tokenizer's pad id
    # use_cache: transformers' export recipes (torch.export, ExecuTorch) refuse a generation config without it
    model.generation_config.update(use_cache=True, **special_token_ids(tokenizer))
    if data_args.mode == "supervised":
        # what the model was trained on is what it gets by default: tokenizer(prompt) starts with BOS as the rows
        # did, and answers are decoded greedily (pretraining's sampling defaults would pick wrong answers)
        if data_args.add_bos:
            add_bos_by_default(tokenizer)
        model.generation_config.update(do_sample=False, num_beams=1, temperature=None, top_k=None, top_p=None,
                                       repetition_penalty=None)

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
        with stop_on_signal.install():
            result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(trainer, argv)) from None
    if stop_on_signal.signal is not None:  # stopped after saving this step: no final model, as pretraining
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


def causal_label_smoothing(factor: float):
    """Trainer's label-smoothed loss with the labels shifted, as a causal LM needs, or None without smoothing.

    Trainer shifts them only for models whose class name is in transformers' built-in causal-LM table; any other
    model (a remote-code one, say) would be smoothed against its unshifted labels, each position scored on its own
    input token, which teaches it to copy. MiniGPT adds itself to that table, but a fine-tune may start from any
    causal LM folder, so the shift is asked for here whatever the model."""
    if not factor:
        return None
    smoother = LabelSmoother(epsilon=factor)
    return lambda outputs, labels, num_items_in_batch=None: smoother(
        outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch
    )


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


def peak_learning_rate(trainer: Trainer) -> float | None:
    """The highest learning rate an optimizer step of this run used. Not --learning_rate: a warmup as long as the run
    (warmup_steps >= max_steps) stops before reaching it. Trainer's schedules are LambdaLR, a pure function of the
    step (rate = base * lambda(step), step s for the s+1-th update), so the peak is exact, resumed runs included;
    any other scheduler falls back to the largest rate in the log."""
    scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)  # unwrap accelerate's wrapper
    lambdas, bases = getattr(scheduler, "lr_lambdas", None), getattr(scheduler, "base_lrs", None)
    steps = trainer.state.global_step
    if lambdas and bases and steps > 0:
        return max(base * rate(step) for base, rate in zip(bases, lambdas) for step in range(steps))
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    return max(logged) if logged else None


def base_model_record(base: str) -> dict:
    """What the model card says of the model a fine-tune started from: a Hub id as given ({"name", "hub": true},
    the card's `base_model:` metadata); a local folder by its name, never its absolute path (the card is published),
    with its own training facts (data, tokens) read from its records by the model card's reader (train_state.json
    of a pretrain run or checkpoint, training_summary.json of a fine-tune)."""
    from minigpt.hub.model_card import read_training_info  # the card's own reader of a run's records

    folder = Path(base).expanduser()
    if not folder.is_dir():
        return {"name": base, "hub": True}
    folder = folder.resolve()
    name = folder.name
    if re.fullmatch(r"(step|checkpoint)-\d+", name):  # a checkpoint: say of which run
        run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
        name = str(Path(run.name, folder.relative_to(run)))
    record = {"name": name, "hub": False}
    facts = read_training_info(folder)
    record.update({key: facts[key] for key in ("data", "tokens", "base_model") if facts.get(key)})
    return record


def write_summary(trainer: Trainer, data_args: DataArguments, output_dir: str, base_model: str | None = None):
    """training_summary.json: the facts no Trainer file records, for the model card (minigpt/hub/model_card.py):
    the data, the base model it started from, the hardware, the peak learning rate reached (beside the configured
    one) and the tokens read."""
    args, state = trainer.args, trainer.state
    summary = {
        "data": f"{Path(data_args.train_file).name} ({data_args.mode} fine-tuning)",
        "learning_rate": peak_learning_rate(trainer),
        "configured_learning_rate": args.learning_rate,
        "warmup_steps": args.get_warmup_steps(state.max_steps),  # a fraction < 1 of the run becomes steps
        "steps": state.global_step,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "hardware": describe_hardware(args.device, args.world_size,
                                      "bf16" if args.bf16 else "fp16" if args.fp16 else None),
    }
    if state.num_input_tokens_seen:  # --include_num_input_tokens_seen (on by default: see adjust_defaults)
        summary["tokens"] = state.num_input_tokens_seen
    elif trainer.train_dataset is not None and state.epoch:  # the epochs run times the tokens of one epoch
        tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        summary["tokens"], summary["tokens_estimated"] = round(tokens_per_epoch * state.epoch), True
    if base_model is not None:
        summary["base_model"] = base_model_record(base_model)
    path = Path(output_dir) / "training_summary.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **summary}, indent=2) + "\n")


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
        # training may have switched the cache off (gradient checkpointing, TRL); the checkpoint is for inference
        model.config.use_cache = True
        # save_pretrained copies the modeling files because MiniGPT registers itself with register_for_auto_class
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        if data_args.mode == "supervised":
            template_of(data_args).save(output_dir)
        trainer.save_state()
        write_summary(trainer, data_args, output_dir, base_model)
        logger.info("Saved the fine-tuned checkpoint to %s", output_dir)


def cli() -> None:
    """The `minigpt-finetune` console script: main(), whose return value would otherwise become the exit status."""
    transformers.utils.logging.set_verbosity_warning()
    try:
        main()
    except (ValueError, OSError) as error:  # bad input: its message names the fix, so one line as argparse's own
        raise SystemExit(f"finetune: error: {one_line(error)}") from None
    except KeyboardInterrupt as error:  # Ctrl-C: where the run got to and how to continue it, no traceback
        detail = f" {error}" if str(error) else " before training started; nothing was saved"
        raise SystemExit(interrupted("finetune", detail)) from None


if __name__ == "__main__":
    cli()
