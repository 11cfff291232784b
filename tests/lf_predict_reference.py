"""Run LLaMA-Factory 0.9.5's own `do_predict` (llamafactory.train.tuner.run_exp) from a predict YAML.

Runs under LF's reference venv ($EXPORTER_LF_PYTHON), called by tests/test_predict.py:
    python lf_predict_reference.py CONFIG.yaml METRICS_PATH
METRICS_PATH is a folder holding jieba, rouge_chinese and nltk (LF's `metrics` extra, which its reference venv
lacks); it is appended to sys.path, after LF's own packages. LF writes generated_predictions.jsonl and
predict_results.json into the config's output_dir.
"""

from __future__ import annotations

import sys

import yaml


def main() -> None:
    config, metrics_path = sys.argv[1:3]
    sys.path.append(metrics_path)
    from llamafactory.train.tuner import run_exp

    with open(config, encoding="utf-8") as f:
        run_exp(yaml.safe_load(f))


if __name__ == "__main__":
    main()
