"""Training, fine-tuning and evaluation tools for MiniGPT: run as `minigpt-<name>` or `python -m minigpt.train.<name>`."""
