"""LLaMA-Factory's own SFT encoding, run inside the LLaMA-Factory reference venv ($EXPORTER_LF_PYTHON).

    $EXPORTER_LF_PYTHON tests/lf_reference.py < cases.json > results.json

With {"train": [LF training arguments, ...]} instead, it runs LF's whole data pipeline (`get_train_args`,
`load_tokenizer`, `get_template_and_fix_tokenizer`, `get_dataset`) on each config and prints, per config, the
training examples' `input_ids` and `labels`, the tokenizer's `chat_template` and `eos_token` and the stop ids.

Input: {"groups": [{"template", "tokenizer" (an HF tokenizer dir), "cases": [{"prompt", "response", "system",
"tools", "data_args" (DataArguments overrides: cutoff_len, train_on_prompt, mask_history, enable_thinking, ...)}]}]}.
Output, per group: what `get_template_and_fix_tokenizer` made of the tokenizer with default arguments
(`chat_template`, `eos_token`, `stop_ids`) and per case LF's `input_ids` and `labels` from
`SupervisedDatasetProcessor`, or `error` when LF refuses the case. It imports nothing from exporter: it is the
independent reference.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import warnings


def _processor(tpl: object) -> object | None:
    """LF loads a multimodal model's processor with its tokenizer, and its VLM plugins (gemma3, llama4, pixtral,
    qwen3_vl) refuse to run without one even on text-only data. For text without <image>/<video>/<audio>
    placeholders they only check that it is there (and read the attributes below), so the tiny text-only fixtures
    get a stand-in carrying them: the text path LF takes for a model dir that has a processor."""
    from types import SimpleNamespace

    if getattr(tpl.mm_plugin, "image_token", None) is None:
        return None
    sub = SimpleNamespace(merge_size=2, patch_size=14, temporal_patch_size=2)
    return SimpleNamespace(
        image_processor=sub, video_processor=sub, boi_token="<start_of_image>", full_image_sequence="<image>"
    )


def train_examples(args: dict) -> dict:
    """LF's training examples for a training config, as `llamafactory-cli train` prepares them."""
    import contextlib

    os.environ["DISABLE_VERSION_CHECK"] = "1"
    with contextlib.redirect_stdout(sys.stderr):  # LF prints an example to stdout
        from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
        from llamafactory.hparams import get_train_args
        from llamafactory.model import load_tokenizer

        model_args, data_args, training_args, _, _ = get_train_args(args)
        tokenizer = load_tokenizer(model_args)["tokenizer"]
        tpl = get_template_and_fix_tokenizer(tokenizer, data_args)
        ds = get_dataset(tpl, model_args, data_args, training_args, "sft", tokenizer)["train_dataset"]
    return {
        "examples": [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in ds],
        "chat_template": tokenizer.chat_template,
        "eos_token": tokenizer.eos_token,
        "stop_ids": sorted(tpl.get_stop_token_ids(tokenizer)),
    }


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    request = json.load(sys.stdin)
    if "train" in request:
        logging.disable(logging.WARNING)
        json.dump([train_examples(args) for args in request["train"]], sys.stdout, ensure_ascii=False)
        return
    from llamafactory.data import template as lf_template
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    logging.disable(logging.WARNING)
    out = []
    for group in request["groups"]:
        name = group["template"]
        # load_tokenizer's arguments (use_fast, split_special_tokens=False, padding_side="right")
        tokenizer = AutoTokenizer.from_pretrained(
            group["tokenizer"], use_fast=True, split_special_tokens=False, padding_side="right"
        )
        fixed = lf_template.get_template_and_fix_tokenizer(tokenizer, DataArguments(template=name))
        result = {
            "chat_template": tokenizer.chat_template,
            "eos_token": tokenizer.eos_token,
            "stop_ids": sorted(fixed.get_stop_token_ids(tokenizer)),
            "cases": [],
        }
        original = lf_template.TEMPLATES[name]
        for case in group["cases"]:
            lf_template.TEMPLATES[name] = copy.deepcopy(original)  # get_template_and_fix_tokenizer mutates it
            try:
                data_args = DataArguments(template=name, **case.get("data_args", {}))
                tpl = lf_template.get_template_and_fix_tokenizer(tokenizer, data_args)
                proc = SupervisedDatasetProcessor(
                    template=tpl, tokenizer=tokenizer, processor=_processor(tpl), data_args=data_args
                )
                enc = proc.preprocess_dataset(
                    {
                        "_prompt": [case["prompt"]],
                        "_response": [case["response"]],
                        "_system": [case.get("system", "")],
                        "_tools": [case.get("tools", "")],
                        "_images": [None],
                        "_videos": [None],
                        "_audios": [None],
                    }
                )
                result["cases"].append({"input_ids": enc["input_ids"][0], "labels": enc["labels"][0]})
            except Exception as e:  # LF refusing a case is a result too
                result["cases"].append({"error": f"{type(e).__name__}: {e}"})
            finally:
                lf_template.TEMPLATES[name] = original
        out.append(result)
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
