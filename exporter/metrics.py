"""BLEU-4 and ROUGE-1/2/L of generated answers, defined exactly as LLaMA-Factory 0.9.5 defines them.

LLaMA-Factory's `ComputeSimilarity` (`train/sft/metric.py`), per sample:
- ROUGE-1/2/L F-scores from `rouge-chinese` on the jieba word segmentation of prediction and label joined by
  spaces; 0 for all three when either side has no word after whitespace splitting (an empty prediction);
- BLEU-4 from nltk's `sentence_bleu` on the *characters* of prediction and label, smoothing method 3;
- each score x100 and rounded to 4 decimals; the reported number is the mean over samples (numpy's mean).
We call the same libraries (extra `eval`); nothing here re-implements a metric. nltk needs no data files for this.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from exporter.errors import UserError

KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
_ZERO = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}


def _libraries() -> tuple[Any, Any, Any, Any]:
    """(jieba, Rouge, sentence_bleu, SmoothingFunction), quiet (jieba logs its dictionary build by default)."""
    try:
        import logging

        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as e:
        raise UserError(
            f"BLEU/ROUGE need jieba, rouge-chinese and nltk ({e.name} is missing): pip install 'exporter[eval]'"
        ) from None
    jieba.setLogLevel(logging.CRITICAL)
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def warm() -> None:
    """Load the libraries now (a UserError when the [eval] extra is missing) and build jieba's dictionary (about a
    second, once per process), so that a timed `similarity` measures the scoring alone."""
    _libraries()[0].initialize()


def sample_scores(prediction: str, label: str) -> dict[str, float]:
    """LLaMA-Factory's four scores (x100, rounded to 4 decimals) of one prediction against its label."""
    jieba, rouge_cls, sentence_bleu, smoothing = _libraries()
    hypothesis = list(jieba.cut(prediction))
    reference = list(jieba.cut(label))
    if not " ".join(hypothesis).split() or not " ".join(reference).split():
        rouge = _ZERO
    else:
        # rouge-chinese rebuilds the LCS recursively (depth ~ words in a sentence): long answers need headroom
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 4 * (len(hypothesis) + len(reference)) + 1000))
        try:
            rouge = rouge_cls().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        finally:
            sys.setrecursionlimit(limit)
    out = {k: round(v["f"] * 100, 4) for k, v in rouge.items()}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=smoothing().method3)
    out["bleu-4"] = round(bleu * 100, 4)
    return {k: out[k] for k in KEYS}


def similarity(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean of `sample_scores` over all pairs, keyed `bleu-4`, `rouge-1`, `rouge-2`, `rouge-l`."""
    import numpy as np

    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise UserError("no predictions to score")
    per = [sample_scores(p, lab) for p, lab in zip(predictions, labels, strict=True)]
    return {k: float(np.mean([s[k] for s in per])) for k in KEYS}
