"""MiniGPT's training, fine-tuning and evaluation tools: `minigpt-<name>`, or `python -m minigpt.train.<name>`."""
