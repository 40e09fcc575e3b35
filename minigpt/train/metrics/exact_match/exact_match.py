"""Exact match between generated and reference strings, as an `evaluate` metric module.

    metric = evaluate.load(minigpt.train.metrics.metric_path("exact_match"))
    metric.compute(predictions=["bonjour"], references=["bonjour "])  # {"exact_match": 1.0}

By default both sides are stripped of surrounding whitespace and nothing else is normalised: case and
punctuation count (`ignore_case=True` relaxes the case).
"""

import evaluate

from minigpt.train.metrics import metric_info


class ExactMatch(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, predictions="string", references="string")

    def _compute(self, predictions, references, strip: bool = True, ignore_case: bool = False):
        if not predictions:
            raise ValueError("Exact match needs at least one prediction.")

        def norm(s: str) -> str:
            s = s.strip() if strip else s
            return s.lower() if ignore_case else s

        hits = sum(norm(p) == norm(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions), "num_examples": len(predictions)}
