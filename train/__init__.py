"""Training, fine-tuning and evaluation tools for MiniGPT (scripts run as `python -m train.<name>` or by path)."""
