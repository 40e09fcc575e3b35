"""chrF (character n-gram F-score, Popović 2015) through sacrebleu, as an `evaluate` metric module.

    metric = evaluate.load(minigpt.train.metrics.metric_path("chrf"))
    metric.compute(predictions=["le chat noir"], references=["un chat noir"])  # {"chrf": 0-100 score, ...}

A corpus-level score with one reference per prediction; `word_order=2` gives chrF++. It credits near misses
("chiens" for "chien") that exact match scores as 0, which makes it the better signal for small models.
"""

import evaluate
import sacrebleu

from minigpt.train.metrics import metric_info


class Chrf(evaluate.Metric):
    def _info(self):
        citation = "Maja Popović. chrF: character n-gram F-score for automatic MT evaluation. WMT 2015."
        return metric_info(__doc__, citation, predictions="string", references="string")

    def _compute(self, predictions, references, char_order: int = 6, word_order: int = 0, beta: int = 2):
        if not predictions:
            raise ValueError("chrF needs at least one prediction.")
        chrf = sacrebleu.metrics.CHRF(char_order=char_order, word_order=word_order, beta=beta)
        score = chrf.corpus_score(list(predictions), [list(references)])
        return {"chrf": score.score, "char_order": char_order, "word_order": word_order, "beta": beta,
                "signature": str(chrf.get_signature())}
