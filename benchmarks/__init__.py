"""Speed and memory of MiniGPT against transformers' GPT2LMHeadModel, measured in the same process."""
