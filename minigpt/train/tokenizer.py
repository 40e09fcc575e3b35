"""A byte-level BPE tokenizer trained with the `tokenizers` library and wrapped as a transformers fast tokenizer,
and the three checks of how a tokenizer and a model fit together: vocabulary, special-token ids, context length.

Byte-level means every string is encodable (no unknown token): the 256 byte symbols are the initial alphabet,
as in GPT-2. The special tokens are <|bos|>, <|eos|> and <|pad|>; EOS also separates packed documents.
"""

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from minigpt.sources import adapter_base, check_local_path

logger = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and return it as a `PreTrainedTokenizerFast` with bos/eos/pad set."""
    if vocab_size < 256 + 3:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs the 256 byte symbols plus "
            "3 special tokens, so at least 259."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(model: str, tokenizer: str | None, kind: str) -> str:
    """Where to load a model's tokenizer from: `tokenizer` if given, else the model's folder, or, for an adapter
    folder saved without a tokenizer (`kind` "adapter", from check_model_path), its base model's."""
    if tokenizer:
        return tokenizer
    return adapter_base(model) if kind == "adapter" and not has_tokenizer(model) else model


def load_tokenizer(path: str, option: str = "--tokenizer", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load an existing tokenizer folder (ours or any transformers one) and make sure it can pad. `option` names
    the command-line flag that gives another tokenizer, for the error of a folder without one."""
    check_local_path(path, "folder", option)
    if Path(path).is_dir() and not has_tokenizer(path):
        raise ValueError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Pass the tokenizer the model was "
            f"trained with: {option} DIR, or copy its files into {path} (tokenizer.save_pretrained({str(path)!r}))."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer in {path} has no EOS token; MiniGPT needs one to separate documents.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_bos_by_default(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make `tokenizer(text)` start with BOS, as supervised fine-tuning rows do, so that whoever calls the saved
    tokenizer the ordinary way (a `pipeline`, `tokenizer(prompt, return_tensors="pt")`) gives the model what it was
    trained on. `add_special_tokens=False` still encodes the bare text. A fast tokenizer gets a TemplateProcessing
    post-processor (saved in tokenizer.json) and add_bos_token=True (saved in tokenizer_config.json), so both
    AutoTokenizer and PreTrainedTokenizerFast.from_pretrained load it the same way."""
    if tokenizer.bos_token_id is None:
        return  # the rows have no BOS either (PromptTemplate.prompt_ids adds it only where there is one)
    if not hasattr(tokenizer, "update_post_processor"):
        logger.warning("%s cannot be told to add BOS: prompts given to the saved model must start with %s, as the "
                       "training rows did (or train with --add_bos false).", type(tokenizer).__name__,
                       tokenizer.bos_token)
        return
    tokenizer.add_bos_token = True  # the setter rebuilds the post-processor: "<bos>:0 $A:0"


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The tokenizer's BOS, EOS and pad ids under the names that the model config, `GenerationConfig` and
    `generate()` take, so that all three agree with the tokenizer: `GenerationConfig(**special_token_ids(tok))`."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def context_length(model, tokenizer: PreTrainedTokenizerBase | None = None) -> int | None:
    """The most positions `model` reads: its config's max_position_embeddings (n_positions for MiniGPT and GPT-2),
    else the tokenizer's model_max_length where the tokenizer sets one, else None (no known limit)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None and tokenizer is not None and tokenizer.model_max_length < VERY_LARGE_INTEGER:
        limit = tokenizer.model_max_length  # VERY_LARGE_INTEGER is what a tokenizer without a limit reports
    return limit


def check_vocab(tokenizer: PreTrainedTokenizerBase, model) -> None:
    """A token id past the embedding table crashes deep inside the first forward; say it up front."""
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab_size}: they do not belong "
            "together. Pass the tokenizer the model was trained with (minigpt.train.finetune --tokenizer_name_or_path, "
            "minigpt.train.evaluation --tokenizer), or a checkpoint built for this tokenizer."
        )
    if vocab_size - len(tokenizer) >= 128:  # padding to a multiple of 64 is normal; more means another tokenizer
        logger.warning("The model embeds %d ids but the tokenizer has only %d tokens; is it the right tokenizer?",
                       vocab_size, len(tokenizer))
