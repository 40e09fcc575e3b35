"""Next-token accuracy from per-batch counts, as an `evaluate` metric module.

    metric = evaluate.load(minigpt.train.metrics.metric_path("next_token_accuracy"))
    metric.add_batch(correct=[argmax_hits, ...], total=[predicted_tokens, ...])
    metric.compute()  # {"next_token_accuracy": sum(correct) / sum(total), "num_tokens": sum(total)}

A hit is a position where the model's most likely next token (argmax of the logits) is the token that follows.
Counts rather than per-token booleans keep the metric cheap to feed for millions of tokens.
"""

import evaluate

from minigpt.train.metrics import metric_info


class NextTokenAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, correct="int64", total="int64")

    def _compute(self, correct, total):
        n = sum(total)
        if n <= 0:
            raise ValueError("Next-token accuracy needs at least one predicted token; every total was 0.")
        if any(c > t or c < 0 for c, t in zip(correct, total)):
            raise ValueError("Each correct count must lie between 0 and its total.")
        return {"next_token_accuracy": sum(correct) / n, "num_tokens": n}
