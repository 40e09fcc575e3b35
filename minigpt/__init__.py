"""MiniGPT's tools: `minigpt.train` (pretraining, fine-tuning, evaluation) and `minigpt.hub` (cards, pushes, exports).

The model itself is the `modeling_minigpt` package, kept under that name because checkpoints import it by it.
"""
