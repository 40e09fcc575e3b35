"""Publishing MiniGPT checkpoints: model cards, Hub pushes and weight conversion."""
