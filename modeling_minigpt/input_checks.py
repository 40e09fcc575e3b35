"""MiniGPTModel's checks of its inputs: what would crash deep inside a kernel, or silently give garbage, becomes an
error that names the fix. It sits beside the model so that save_pretrained copies it with the modeling code, as a
relative import.
"""


def check_inputs(config, input_ids, attention_mask, position_ids, B: int, T: int, past_length: int) -> None:
    """Turn the inputs that would crash deep inside a kernel (or silently give garbage) into clear errors.

    Shapes are checked on every call. Values need `.item()`, which waits for the device, so they are checked
    where the data enters, the prefill (an empty cache), and not on decode steps, whose ids come from the
    model itself; positions only once the cache could have run past the learned table."""
    if B == 0 or T == 0:
        raise ValueError(f"The input is empty (batch {B}, length {T}); pass at least one token per row.")
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape != (B, past_length + T):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids needs "
            f"({B}, {past_length + T}) (batch, cached + new tokens); build both from the same tokenizer call."
        )
    prefill = past_length == 0
    if input_ids is not None and prefill:
        low, high = input_ids.min().item(), input_ids.max().item()
        if low < 0 or high >= config.vocab_size:
            bad = high if high >= config.vocab_size else low
            raise IndexError(
                f"Token id {bad} is outside the vocabulary [0, {config.vocab_size}). Check that the "
                "tokenizer matches the model (len(tokenizer) <= config.vocab_size), or resize the embeddings "
                "with model.resize_token_embeddings(len(tokenizer))."
            )
    # positions derived from the mask never exceed past_length + T - 1, so a decode step within the table
    # needs no look at their values
    if config.position_embedding_type == "learned" and (prefill or past_length + T > config.n_positions):
        last = position_ids.max().item()
        if last >= config.n_positions:
            raise ValueError(
                f"The sequence reaches position {last}, but learned position embeddings stop at "
                f"n_positions={config.n_positions}. Truncate the input (e.g. tokenizer(..., truncation=True, "
                f"max_length={config.n_positions})) or generate fewer new tokens."
            )
