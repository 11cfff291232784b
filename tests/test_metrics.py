"""exporter.metrics against jieba + rouge-chinese + nltk called directly, the way LLaMA-Factory 0.9.5's
`ComputeSimilarity` calls them (per sample x100 rounded to 4 places, numpy mean; ROUGE 0 for an empty side)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

jieba = pytest.importorskip("jieba")
rouge_chinese = pytest.importorskip("rouge_chinese")
bleu_score = pytest.importorskip("nltk.translate.bleu_score")

from exporter import metrics  # noqa: E402

PAIRS = [
    ("今天天气很好，我们去公园散步吧。", "今天天气不错，我们一起去公园散步。"),
    ("我是一个由 Acme 训练的助手。", "我是 Exa，由 Acme 开发的人工智能助手。"),
    ("The quick brown fox jumps over the lazy dog.", "A quick brown fox jumped over the lazy dog."),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("", "An answer the model never gave."),  # empty prediction
    ("   ", "空白的预测"),  # whitespace only: no words
    ("Hello", ""),  # empty label
    ("", ""),
    ("ok", "ok"),  # shorter than 4-grams
    ("混合 mixed 文本 text, with 标点!", "mixed 文本 and text 与标点。"),
    ("。", "你好"),
    ("1 2 3 4 5 6 7 8 9 10 " * 60, "1 2 3 4 5 6 7 8 9 10 " * 55),  # long: deep LCS recursion in rouge-chinese
]


def reference(pred: str, label: str) -> dict[str, float]:
    jieba.setLogLevel(logging.CRITICAL)
    hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hyp).split()) == 0 or len(" ".join(ref).split()) == 0:
        res = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        import sys

        old = sys.getrecursionlimit()
        sys.setrecursionlimit(20000)
        try:
            res = rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        finally:
            sys.setrecursionlimit(old)
    out = {k: round(v["f"] * 100, 4) for k, v in res.items()}
    bleu = bleu_score.sentence_bleu(
        [list(label)], list(pred), smoothing_function=bleu_score.SmoothingFunction().method3
    )
    out["bleu-4"] = round(bleu * 100, 4)
    return out


@pytest.mark.parametrize("pred,label", PAIRS)
def test_sample_scores_equal_reference(pred: str, label: str) -> None:
    assert metrics.sample_scores(pred, label) == reference(pred, label)


def test_mean_equals_reference_chinese_english_and_empty() -> None:
    preds, labels = [p for p, _ in PAIRS], [lab for _, lab in PAIRS]
    per = [reference(p, lab) for p, lab in PAIRS]
    expected = {k: float(np.mean([s[k] for s in per])) for k in metrics.KEYS}
    got = metrics.similarity(preds, labels)
    assert got == expected
    assert set(got) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    # the empty prediction really scores 0 and the identical pair 100 on what it can
    assert metrics.sample_scores("", "An answer.") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert metrics.sample_scores("你好世界", "你好世界")["rouge-1"] == pytest.approx(100.0, abs=1e-4)


def test_scoring_needs_no_nltk_data(tmp_path, monkeypatch) -> None:
    """sentence_bleu reads no corpus: with NLTK_DATA pointing at an empty dir it still scores (no download)."""
    import subprocess
    import sys

    env = {"NLTK_DATA": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    code = "from exporter import metrics; print(metrics.similarity(['今天很好'], ['今天不错'])['bleu-4'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) > 0
    assert out.stderr == ""  # no jieba banner, no warnings
