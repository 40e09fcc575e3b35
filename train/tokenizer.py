"""A byte-level BPE tokenizer trained with the `tokenizers` library and wrapped as a transformers fast tokenizer.

Byte-level means every string is encodable (no unknown token): the 256 byte symbols are the initial alphabet,
as in GPT-2. The special tokens are <|bos|>, <|eos|> and <|pad|>; EOS also separates packed documents.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load an existing tokenizer folder (ours or any transformers one) and make sure it can pad."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer in {path} has no EOS token; MiniGPT needs one to separate documents.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
