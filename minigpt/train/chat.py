"""Chat: the template a fine-tune saves with its tokenizer, and conversations as labelled token rows.

A conversation is TRL's conversational format, `{"messages": [{"role": "system" | "user" | "assistant",
"content": ...}, ...]}`. A model without a chat template gets a ChatML one, its role markers `<|im_start|>` and
`<|im_end|>` added as special tokens (their embedding rows initialised to the mean of the others, as transformers'
mean_resizing does), and `<|im_end|>` joins EOS in generation_config.eos_token_id, so that generation stops at the end
of the answer. Assistant turns sit in `{% generation %}` blocks, so `apply_chat_template(...,
return_assistant_tokens_mask=True)` says which tokens are the assistant's: the loss covers those (every assistant
turn, and the `<|im_end|>` that ends it) and nothing else, whatever tokens the turns share with the rest.

A supervised (prompt/answer) fine-tune saves its prompt format as a chat template too (`pairs_chat_template`), so
that chat clients prompt it as it was trained.
"""

import logging

import torch

logger = logging.getLogger("minigpt.train.finetune")

END_OF_TURN = "<|im_end|>"
CHAT_TOKENS = ["<|im_start|>", END_OF_TURN]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def add_chat_template(model, tokenizer) -> list[int]:
    """Give a tokenizer without a chat template the ChatML one and its role markers (new rows of the model's
    embeddings, and of an untied head, set to the mean of the existing rows); return the ids that end an answer,
    for generation_config.eos_token_id. A tokenizer that has a template keeps it."""
    if tokenizer.chat_template is not None:
        return [tokenizer.eos_token_id]
    known = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    else:  # the vocabulary is padded (MiniGPT rounds it up to a multiple of 64): the rows exist, never trained
        with torch.no_grad():
            for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                layer.weight[known : len(tokenizer)] = layer.weight[:known].float().mean(0).to(layer.weight.dtype)
    logger.info("added a ChatML chat template and its tokens %s to the tokenizer", CHAT_TOKENS)
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]


def pairs_chat_template(prompt_template: str, separator: str, add_bos: bool) -> str:
    """The chat template of a supervised fine-tune: each user turn written as in training (the prompt template,
    then the separator), each assistant turn its answer and EOS; a system message is left out (pairs have none)."""
    before, after = prompt_template.split("{prompt}", 1)

    def literal(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    return (
        ("{{- bos_token }}" if add_bos else "")
        + "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        f"{{{{- {literal(before)} + message['content'] + {literal(after + separator)} }}}}"
        "{%- elif message['role'] == 'assistant' %}"
        "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
        "{%- endif %}"
        "{%- endfor %}"
    )


def check_messages(messages, row: str) -> None:
    """A conversation of role/content messages that ends with the assistant's turn, or a ValueError naming the row."""
    roles = ("system", "user", "assistant")
    shape = f"'messages' must be a list of {{'role': one of {roles}, 'content': text}}"
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {row}: {shape}; got {messages!r:.200}")
    for n, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str)):
            raise ValueError(f"row {row}: {shape}; its message {n} is {m!r:.200}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"row {row}: the conversation has no assistant turn, so nothing to learn.")


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one conversation: labels are the ids of the assistant's tokens (the
    template's generation blocks), -100 elsewhere. A conversation longer than max_length keeps its last tokens."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)  # fmt: skip
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    truncated = len(ids) > max_length
    return ids[-max_length:], labels[-max_length:], truncated
