"""Perplexity from summed negative log-likelihoods, as an `evaluate` metric module.

`evaluate` ships no metric scripts offline, so the project carries its own and loads it by path:

    metric = evaluate.load("minigpt/train/metrics/perplexity")       # a folder holding this file
    metric.add_batch(nll=[sum_of_token_nll_in_nats, ...], num_tokens=[count, ...])
    metric.compute()  # {"perplexity": exp(total_nll / total_tokens), "loss": total_nll / total_tokens}

Each entry is a batch (or a document): the sum of -log p(token) over its predicted tokens, and how many tokens
that was. Summing before dividing weights every token equally, whatever the batch sizes, and the metric can be
fed batch by batch, or gathered across processes.
"""

import math

import evaluate

from minigpt.train.metrics import metric_info


class Perplexity(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, nll="float64", num_tokens="int64")

    def _compute(self, nll, num_tokens):
        total_tokens = sum(num_tokens)
        if total_tokens <= 0:
            raise ValueError("Perplexity needs at least one predicted token; every num_tokens entry was 0.")
        loss = sum(nll) / total_tokens
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "num_tokens": total_tokens}
