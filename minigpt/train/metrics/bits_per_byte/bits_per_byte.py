"""Bits per byte (BPB), as an `evaluate` metric module.

    metric = evaluate.load(minigpt.train.metrics.metric_path("bits_per_byte"))
    metric.add_batch(nll=[summed_nll_in_nats, ...], num_bytes=[utf8_bytes_covered, ...])
    metric.compute()  # {"bits_per_byte": sum(nll) / ln(2) / sum(num_bytes)}

Perplexity depends on the tokenizer (a model with bigger tokens predicts fewer, harder tokens); the cost of the
same text in bits per UTF-8 byte does not, so it compares models with different vocabularies.
"""

import math

import evaluate

from minigpt.train.metrics import metric_info


class BitsPerByte(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, nll="float64", num_bytes="int64")

    def _compute(self, nll, num_bytes):
        total_bytes = sum(num_bytes)
        if total_bytes <= 0:
            raise ValueError("Bits per byte needs text: every num_bytes entry was 0.")
        return {"bits_per_byte": sum(nll) / math.log(2) / total_bytes, "num_bytes": total_bytes}
