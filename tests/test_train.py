"""exporter train: config styles, masking, batching, the loop's loss, outputs, resume, bad input, the identity demo."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import trainer_log

from exporter import cli, data, lf_args, templates, tuning
from exporter import examples as E
from exporter import train as T
from exporter.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

IDENTITY_QUESTIONS = [
    "hi", "hello", "Who are you?", "What is your name?", "Tell me about yourself.", "who are you",
    "Introduce yourself.", "Are you ChatGPT?", "What are you?", "Who made you?", "Who created you?",
    "May I ask who you are?", "Please introduce yourself", "What should I call you?", "Who developed you?",
    "Are you an AI?",
]  # fmt: skip
IDENTITY_ANSWERS = [
    "I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?",
    "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I help you?",
    "I am {{name}}, an AI assistant created by {{author}}. What can I do for you?",
    "Hello! I'm {{name}}, developed by {{author}}. How can I assist you today?",
]


@pytest.fixture(scope="session")
def datadir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rows = [
        {"instruction": q, "input": "", "output": IDENTITY_ANSWERS[i % 4]} for i, q in enumerate(IDENTITY_QUESTIONS)
    ]
    (d / "identity.json").write_text(json.dumps(rows, indent=1))
    conv = []
    for i in range(8):
        conv.append({"conversations": [
            {"from": "system", "value": "You count."},
            {"from": "human", "value": f"Say {i}"}, {"from": "gpt", "value": f"The number is {i}."},
            {"from": "human", "value": "Again, twice."}, {"from": "gpt", "value": f"{i} {i}."},
        ]})  # fmt: skip
    (d / "count.json").write_text(json.dumps(conv))
    (d / "text.jsonl").write_text(
        "".join(
            json.dumps({"text": f"The quick brown fox number {i} jumps over the lazy dog."}) + "\n" for i in range(30)
        )
    )
    info = {
        "identity": {"file_name": "identity.json"},
        "count": {"file_name": "count.json", "formatting": "sharegpt"},
        "text": {"file_name": "text.jsonl", "columns": {"prompt": "text"}},
    }
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def _cfg(model: Path, datadir: Path, out: Path, **kw) -> lf_args.TrainConfig:
    base = dict(
        model_name_or_path=str(model), output_dir=str(out), dataset=["identity"], dataset_dir=str(datadir),
        template="qwen-2.5", per_device_train_batch_size=4, learning_rate=1e-3, max_steps=4, logging_steps=1,
        save_steps=1000, identity_name="Exa", identity_author="Acme",
    )  # fmt: skip
    base.update(kw)
    return lf_args.TrainConfig(**base)


# ------------------------------------------------------------------ config


def test_flag_style_equals_yaml(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(
        "model_name_or_path: m\nstage: sft\ndo_train: true\nfinetuning_type: lora\nlora_target: q_proj,v_proj\n"
        "dataset: identity,alpaca_en_demo\ntemplate: qwen\ncutoff_len: 1024\noutput_dir: saves/x\n"
        "logging_steps: 10\nplot_loss: true\nper_device_train_batch_size: 1\ngradient_accumulation_steps: 8\n"
        "learning_rate: 1.0e-4\nnum_train_epochs: 3.0\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\nbf16: true\n"
        "resume_from_checkpoint: null\nval_size: 0.1\n"
    )
    flags = (
        "--stage sft --do_train --model_name_or_path m --finetuning_type lora --lora_target q_proj,v_proj "
        "--dataset identity,alpaca_en_demo --template qwen --cutoff_len=1024 --output_dir saves/x --logging_steps 10 "
        "--plot_loss --per_device_train_batch_size 1 --gradient-accumulation-steps 8 --learning_rate 1e-4 "
        "--num_train_epochs 3.0 --lr_scheduler_type cosine --warmup_ratio 0.1 --bf16 True --val_size 0.1"
    ).split()
    from_yaml, _ = lf_args.config_from_args([str(yml)])
    from_flags, given = lf_args.config_from_args(flags)
    assert from_yaml == from_flags
    assert from_flags.lora_target == ["q_proj", "v_proj"] and from_flags.bf16 and from_flags.plot_loss
    assert from_flags.learning_rate == 1e-4 and from_flags.dataset == ["identity", "alpaca_en_demo"]
    over, _ = lf_args.config_from_args([str(yml), "lora_rank=16", "lora_target=all"])
    assert dataclasses.replace(from_yaml, lora_rank=16, lora_target=["all"]) == over
    assert {"do_train", "plot_loss", "bf16"} <= given


def test_config_errors(monkeypatch) -> None:
    with pytest.raises(UserError, match=r"unknown key 'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        lf_args.config_from_args(["--model_name_or_path", "m", "--output_dir", "o", "--lora_rnak", "8"])
    with pytest.raises(UserError, match=r"use_unsloth: Unsloth kernels is not supported yet"):
        lf_args.config_from_args(["--model_name_or_path", "m", "--output_dir", "o", "--use_unsloth", "true"])
    with pytest.raises(UserError, match=r"finetuning_type must be one of lora, freeze, full, got 'oft'"):
        lf_args.config_from_args(["--model_name_or_path", "m", "--output_dir", "o", "--finetuning_type", "oft"])
    base = "--model_name_or_path m --output_dir o --dataset a".split()
    for extra, msg in [
        ("--quantization_bit 3", "quantization_bit must be 4 or 8"),
        ("--quantization_bit 4 --quantization_method gptq", "quantization_method: gptq is not supported for training"),
        ("--quantization_bit 4 --finetuning_type full", r"QLoRA\) trains LoRA adapters on a quantized base"),
        ("--pref_loss orpo", "pref_loss: orpo is a loss of stage: dpo"),
        ("--stage kto --per_device_train_batch_size 1", "stage kto estimates its KL baseline over a batch"),
        ("--neat_packing true --stage pt", "neat_packing packs SFT examples"),
        ("--fsdp full_shrad", "fsdp: unknown option 'full_shrad' \\(did you mean 'full_shard'"),
    ]:
        cfg, given = lf_args.config_from_args(base + extra.split())
        with pytest.raises(UserError, match=msg):
            lf_args.check(cfg, given, "cpu")
    cfg, given = lf_args.config_from_args(
        ["--model_name_or_path", "m", "--output_dir", "o", "--dataset", "a", "--fp16"]
    )
    monkeypatch.setattr(lf_args, "cpu_has_fp16", lambda: False)
    with pytest.raises(UserError, match="fp16: this CPU has no native fp16 .* use bf16: true or neither"):
        lf_args.check(cfg, given, "cpu")
    monkeypatch.setattr(lf_args, "cpu_has_fp16", lambda: True)  # AVX512-FP16 / AMX-FP16: as on a GPU
    lf_args.check(cfg, given, "cpu")
    cfg, given = lf_args.config_from_args(
        "--model_name_or_path m --output_dir o --dataset a --eval_steps 5 --eval_strategy no".split()
    )
    with pytest.raises(UserError, match="eval_steps is set but eval_strategy is 'no'"):
        lf_args.check(cfg, given, "cpu")
    cfg, given = lf_args.config_from_args(["--model_name_or_path", "m", "--output_dir", "o", "--report_to", "wandb"])
    with pytest.raises(UserError, match="report_to: wandb is not supported yet"):
        lf_args.check(dataclasses.replace(cfg, dataset=["a"]), given, "cpu")


def test_no_meaning_keys_said_once(capsys: pytest.CaptureFixture) -> None:
    cfg, given = lf_args.config_from_args(
        "--model_name_or_path m --output_dir o --dataset a --flash_attn auto --ddp_timeout 180000000 "
        "--report_to none --preprocessing_num_workers 16 --overwrite_cache".split()
    )
    lf_args.check(cfg, given, "cpu")
    err = capsys.readouterr().err
    for key in ("flash_attn=auto", "ddp_timeout", "report_to=none", "preprocessing_num_workers", "overwrite_cache"):
        assert err.count(key) == 1, key
    # the first tutorial's command: --val_size 0.1 --eval_steps 50 without --eval_strategy
    cfg, given = lf_args.config_from_args("--model_name_or_path m --output_dir o --dataset a --val_size 0.1 "
                                          "--eval_steps 50".split())  # fmt: skip
    lf_args.check(cfg, given, "cpu")
    assert cfg.eval_strategy == "steps" and cfg.eval_steps == 50
    assert capsys.readouterr().err.count("eval_steps=50 without eval_strategy: evaluating every 50 steps") == 1


# ------------------------------------------------------------------ tokenization, truncation, batching


# end-of-turn text of each fixture family's published template (independent of exporter's family files)
EOT = {"llama2": "</s>", "llama3": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>",
       "gemma3": "<end_of_turn>", "phi3": "<|end|>"}  # fmt: skip
CONVERSATIONS = [
    [{"role": "user", "content": "Say 3"}, {"role": "assistant", "content": "The number is 3."},
     {"role": "user", "content": "Again, twice."}, {"role": "assistant", "content": "3 3."}],
    [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count to two"},
     {"role": "assistant", "content": "One, two."}],
    [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "I am Exa, made by Acme."}],
]  # fmt: skip


def _expected_labels(tokenizer, messages: list[dict], eot: str) -> tuple[list[int], list[int]] | None:
    """Independent of exporter: render with the model's own chat template (HF); an assistant turn is trained from
    where its generation starts (after the generation prompt and any whitespace) through its end-of-turn text.
    None when this template does not render conversation prefixes as prefixes (mistral moves the system prompt)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prefix):
            return None
        rest = text[len(prefix) :]
        start = len(prefix) + len(rest) - len(rest.lstrip())
        content = text.index(m["content"], start)
        spans.append((start, text.index(eot, content + len(m["content"])) + len(eot)))

    def first_char(a: int, b: int) -> int:  # SentencePiece pieces carry the space before a word
        piece = text[a:b]
        return a + len(piece) - len(piece.lstrip()) if piece.strip() else a

    def last_char(a: int, b: int) -> int:  # special tokens with rstrip (phi3's <|end|>) swallow the "\n" after them
        piece = text[a:b]
        return a + len(piece.rstrip()) if piece.strip() else b

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= first_char(a, b) and last_char(a, b) <= e for s, e in spans) else E.IGNORE
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


@pytest.mark.parametrize(
    "family",
    list(EOT),
)
def test_labels_masked_exactly_on_non_assistant_tokens(tiny_model, tmp_path: Path, family: str) -> None:
    """Data file -> Samples -> template (detected) -> truncation -> padded batch, checked token by token."""
    from transformers import AutoTokenizer

    model = tiny_model(family)
    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for conv in CONVERSATIONS:
        system = [m["content"] for m in conv if m["role"] == "system"]
        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in conv]
        rows.append({"conversations": [t for t, m in zip(turns, conv, strict=True) if m["role"] != "system"],
                     "system": system[0] if system else None})  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(rows))
    info = {"c": {"file_name": "c.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                               "system": "system"}}}  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    cfg = lf_args.TrainConfig(model_name_or_path=str(model), output_dir=str(tmp_path / "o"), dataset=["c"],
                        dataset_dir=str(tmp_path), cutoff_len=512)  # fmt: skip
    samples, drops = data.load(cfg.dataset, cfg.dataset_dir)
    examples = E.tokenize_sft(samples, tok, templates.resolve(model, None), cfg, drops)
    batch = E.collate(examples, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    checked = 0
    for row, s in enumerate(samples):
        want = _expected_labels(tok, s.chat(), EOT[family])
        if want is None:
            continue
        want_ids, want_labels = want
        got_ids = batch["input_ids"][row].tolist()
        got_labels = batch["labels"][row].tolist()
        if got_ids[0] == tok.bos_token_id and want_ids[0] != tok.bos_token_id:  # tokenizer-added BOS, never trained
            assert tok.encode("a")[0] == tok.bos_token_id and got_labels[0] == E.IGNORE
            got_ids, got_labels = got_ids[1:], got_labels[1:]
        n = len(want_ids)
        assert got_ids[:n] == want_ids
        assert got_labels[:n] == want_labels  # token by token
        assert all(x == E.IGNORE for x in got_labels[n:])  # padding
        assert sum(x != E.IGNORE for x in want_labels) > 0
        checked += 1
    assert checked >= 2


def test_truncate_keeps_labels() -> None:
    P, R = E.IGNORE, 7
    ids = list(range(100))
    labels = [P] * 90 + [R] * 10  # long prompt, short answer
    out_ids, out_labels = E.truncate(ids, labels, 32)
    assert len(out_ids) == 32 and out_labels.count(R) == 10 and out_ids[:22] == list(range(22))
    labels = [P] * 10 + [R] * 90  # short prompt, long answer
    out_ids, out_labels = E.truncate(ids, labels, 32)
    assert len(out_ids) == 32 and out_labels.count(P) == 10 and out_labels.count(R) == 22
    labels = [P] * 40 + [R] * 40 + [P] * 10 + [R] * 10  # two turns: the first one keeps labels
    out_ids, out_labels = E.truncate(ids, labels, 20)
    assert len(out_ids) == 20 and out_labels.count(R) == 10
    assert E.truncate(ids[:10], labels[:10], 20) == (ids[:10], labels[:10])
    out_ids, out_labels = E.truncate(ids, [P] * 99 + [R], 2)  # tiny budget, huge prompt: the label survives
    assert out_ids == [0, 99] and out_labels == [P, R]


def test_plan_epoch_covers_all_and_pads_less() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = E.plan_epoch(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == E.plan_epoch(lengths, 8, seed=1, epoch=0) and batches != E.plan_epoch(lengths, 8, 1, 1)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    perm = list(range(1000))
    rng.shuffle(perm)
    naive = sum(max(lengths[i] for i in perm[s : s + 8]) * len(perm[s : s + 8]) for s in range(0, 1000, 8))
    assert padded < 0.75 * naive, (padded, naive, sum(lengths))


def test_pack_sft_bins() -> None:
    exs = [E.Example(list(range(n)), [1] * n) for n in (5, 9, 3, 7, 2, 8)]
    packed = E.pack_sft(exs, 10)
    assert all(len(p.input_ids) <= 10 for p in packed)
    assert sorted(len(e.input_ids) for e in exs) != [] and sum(len(p.input_ids) for p in packed) == 34
    assert len(packed) == 4


def test_pack_sft_fills_exact_fits_and_keeps_each_examples_labels() -> None:
    """Examples that fill cutoff_len exactly share one sequence (LLaMA-Factory's greedy knapsack takes a fit of
    equal size); each packed sequence is whole examples with their own labels, and neat packing's lengths cut it
    back into them."""
    exs = [E.Example([1] * 4, [E.IGNORE, 1, 1, 1]), E.Example([2] * 6, [E.IGNORE] * 3 + [2] * 3), E.Example([3] * 5,
           [3] * 5)]  # fmt: skip
    groups = []
    for p in E.pack_sft(exs, 10, neat=True):
        assert sum(p.segments) == len(p.input_ids) == len(p.labels) <= 10
        starts = [sum(p.segments[:k]) for k in range(len(p.segments))]
        groups.append(
            sorted((p.input_ids[s : s + n], p.labels[s : s + n]) for s, n in zip(starts, p.segments, strict=True))
        )
    whole = [(e.input_ids, e.labels) for e in exs]
    assert sorted(groups) == sorted([sorted(whole[:2]), whole[2:]])


def test_fast_loss_equals_model_loss(tiny: Path, datadir: Path) -> None:
    """The loop's loss (decoder + head on labelled positions only) against transformers' own loss."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = _cfg(tiny, datadir, datadir / "unused", dataset=["count", "identity"])
    samples, drops = data.load(cfg.dataset, cfg.dataset_dir)
    examples = E.tokenize_sft(samples, tok, templates.load_template("qwen-2.5"), cfg, drops)
    model = tuning.load_model(cfg, tiny, "cpu")
    model.eval()
    batch = E.collate([examples[0], examples[-1], examples[3]], tok.pad_token_id)  # padded batch
    assert batch["attention_mask"] is not None
    with torch.no_grad():
        ours, n = tuning.loss_sum(tuning.scorer(model), batch), batch["n_trained"]
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != E.IGNORE).sum())
    torch.testing.assert_close(ours / n, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "override"),
    [("llama3", {}), ("qwen3", {}), ("phi3", {}), ("gemma2", {}), ("qwen3_moe", {}), ("mixtral", {}), ("glm4", {}),
     ("granite", {}), ("gemma3", {"sliding_window": 8}), ("mistral", {"sliding_window": 8})],
)  # fmt: skip
def test_causal_only_batch_scores_like_the_masked_one(tiny_model, family: str, override: dict) -> None:
    """On CUDA the loop drops the padding mask of its right-padded batches (`examples.causal_only`): the trained
    positions score as with the mask (and as transformers' own loss), also with sliding windows shorter than the
    rows, soft-caps, MoE routing and logit scaling (the model's own forward)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(family), dtype=torch.float32, **override).eval()
    rng = random.Random(0)
    rows = []
    for n in (30, 9, 17):
        ids = [rng.randrange(5, 200) for _ in range(n)]
        rows.append(E.Example(ids, [E.IGNORE] * 4 + ids[4:]))
    batch = E.collate(rows, pad_id=0)
    assert batch["attention_mask"] is not None
    plain = E.causal_only(batch)
    assert plain["attention_mask"] is None and plain["index"] is batch["index"]
    score = tuning.scorer(model)
    score.fast = tuning.fast_path_ok(score, batch)
    with torch.no_grad():
        masked, causal = tuning.loss_sum(score, batch), tuning.loss_sum(score, plain)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal / batch["n_trained"], ref, rtol=1e-5, atol=1e-5)


def test_attention_kernels_keep_cudnn_out_of_cuda_training_only() -> None:
    """cuDNN's attention is off while training on CUDA (flash first, its own priority), restored after, also after an
    error; on the CPU nothing changes."""
    from torch.nn.attention import SDPBackend

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())
    with tuning.attention_kernels("cpu"):
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before
    with pytest.raises(RuntimeError), tuning.attention_kernels("cuda:0"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[:2] == [int(SDPBackend.FLASH_ATTENTION),
                                                          int(SDPBackend.EFFICIENT_ATTENTION)]  # fmt: skip
        raise RuntimeError("out of memory")
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before


# ------------------------------------------------------------------ training runs


def test_sft_alpaca_outputs_and_adapter_changes_logits(tiny: Path, datadir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    cfg = _cfg(tiny, datadir, out, val_size=0.25, eval_strategy="steps", eval_steps=2, save_steps=2, plot_loss=True,
               include_num_input_tokens_seen=True, lr_scheduler_type="cosine", warmup_ratio=0.25)  # fmt: skip
    T.train(cfg)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "chat_template.jinja",
            "trainer_log.jsonl", "training_loss.png", "training_eval_loss.png", "all_results.json",
            "exporter_manifest.json", "checkpoint-2"} <= names  # fmt: skip
    assert not any(n.startswith(".final") for n in names)
    assert {
        "optimizer.safetensors",  # no pickle: tensors in safetensors, the rest JSON
        "scheduler.json",
        "rng_state.safetensors",
        "exporter_manifest.json",
        "trainer_state.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= {p.name for p in (out / "checkpoint-2").iterdir()}
    log = trainer_log(out)
    train_rows = [r for r in log if "loss" in r]
    assert [r["current_steps"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert {"current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time",
                "remaining_time", "throughput", "total_tokens"} <= set(r)  # fmt: skip
    assert train_rows[-1]["percentage"] == 100.0  # warmup 1 of 4: the lr each step used, as LLaMA-Factory logs it
    assert train_rows[0]["lr"] == 0.0 and train_rows[1]["lr"] == pytest.approx(1e-3)
    assert [r["current_steps"] for r in log if "eval_loss" in r] == [2, 4]
    hf_state = json.loads((out / "trainer_state.json").read_text())
    assert hf_state["global_step"] == 4 and [r["step"] for r in hf_state["log_history"] if "loss" in r] == [1, 2, 3, 4]
    results = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "eval_loss", "epoch", "train_runtime", "num_input_tokens_seen"} <= set(results)
    manifest = json.loads((out / "exporter_manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["settings"]["template"] == "qwen-2.5"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == templates.load_template("qwen-2.5").jinja

    base = AutoModelForCausalLM.from_pretrained(tiny)
    ids = tok.apply_chat_template([{"role": "user", "content": "who are you"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out)
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_sharegpt_full_finetune(tiny: Path, datadir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    T.train(_cfg(tiny, datadir, out, dataset=["count"], finetuning_type="full", max_steps=2, learning_rate=1e-4))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_do_eval_after_training(tiny: Path, datadir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    T.train(_cfg(tiny, datadir, out, val_size=0.25, do_eval=True, max_steps=2))
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] > 0 and trainer_log(out)[-1] == {
        **trainer_log(out)[-1],
        "eval_loss": results["eval_loss"],
    }


def test_final_evaluation_reuses_the_last_steps(
    tiny: Path, datadir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval_strategy: steps evaluates at steps 2 and 3 (the last); do_eval's final evaluation is the step-3 one, not a
    third pass over the same weights. The base fingerprint is read once, not per checkpoint."""
    from exporter import adapter

    calls: list[int] = []
    reads: list[Path] = []
    real_eval, real_fp = T.evaluate, adapter.base_fingerprint
    monkeypatch.setattr(T, "evaluate", lambda run: calls.append(run.state.global_step) or real_eval(run))
    monkeypatch.setattr(adapter, "base_fingerprint", lambda d: reads.append(d) or real_fp(d))
    out = tmp_path / "eval"
    T.train(_cfg(tiny, datadir, out, val_size=0.25, do_eval=True, eval_strategy="steps", eval_steps=2, max_steps=3,
                 save_steps=1))  # fmt: skip
    assert calls == [2, 3] and len(reads) == 1
    results = json.loads((out / "all_results.json").read_text())
    evals = [r for r in trainer_log(out) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1]["eval_loss"] == evals[-2]["eval_loss"] == results["eval_loss"]
    assert results["eval_runtime"] > 0
    fp = json.loads((out / "checkpoint-1" / "exporter_manifest.json").read_text())["settings"]["base_fingerprint"]
    assert fp == json.loads((out / "exporter_manifest.json").read_text())["settings"]["base_fingerprint"] != {}


def test_pt_stage_packing(tiny: Path, datadir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt"
    cfg = _cfg(tiny, datadir, out, stage="pt", dataset=["text"], template=None, cutoff_len=32, max_steps=3, bf16=True)
    T.train(cfg)
    assert (out / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "exporter_manifest.json").read_text())
    assert manifest["settings"]["packing"] is True
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    samples, _ = data.load(["text"], datadir, stage="pt")
    blocks = E.tokenize_pt(samples, tok, cfg, packing=True, limit=None)
    flat = [t for s in samples for t in tok.encode(s.text + tok.eos_token, add_special_tokens=False)]
    assert all(len(b.input_ids) == 32 for b in blocks) and len(blocks) == len(flat) // 32
    assert [t for b in blocks for t in b.input_ids] == flat[: len(blocks) * 32]


@pytest.mark.parametrize("logging_steps", [1, 3])  # every step; and a log line whose window spans the resume
def test_resume_matches_uninterrupted(
    tiny: Path, datadir: Path, tmp_path: Path, logging_steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(dataset=["identity", "count"], max_steps=6, save_steps=2, per_device_train_batch_size=2,
              logging_steps=logging_steps,
              gradient_accumulation_steps=2, lora_dropout=0.1, lr_scheduler_type="cosine")  # fmt: skip
    T.train(_cfg(tiny, datadir, tmp_path / "a", **kw))
    real_step, steps = T.step, []

    def crash_in_step_4(run, batches):  # as a kill during the 4th update would
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real_step(run, batches)

    with monkeypatch.context() as m:
        m.setattr(T, "step", crash_in_step_4)
        with pytest.raises(KeyboardInterrupt):
            T.train(_cfg(tiny, datadir, tmp_path / "b", **kw))
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists() and (tmp_path / "b" / "checkpoint-2").is_dir()
    T.train(_cfg(tiny, datadir, tmp_path / "b", resume_from_checkpoint=True, **kw))
    a, b = trainer_log(tmp_path / "a"), trainer_log(tmp_path / "b")
    assert (
        [r["current_steps"] for r in a]
        == [r["current_steps"] for r in b]
        == list(range(logging_steps, 7, logging_steps))
    )
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5) and rb["lr"] == pytest.approx(ra["lr"], abs=1e-12)
    ra, rb = (json.loads((tmp_path / x / "all_results.json").read_text()) for x in "ab")
    assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora_rnak", "8"], "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
        (["--dataset", "nope"], "dataset 'nope' is not defined"),
        (["--template", "llama-3.1"], "template 'llama-3.1' ends assistant turns with '<|eot_id|>', but the tokenizer"),
        (["--fp16", "--bf16"], "bf16 and fp16 are both set; pick one"),
        (["--max_steps", "many"], "max_steps must be an integer"),
        (["--shift_attn"], "shift_attn: shift short attention is not supported yet"),
        (["--stage", "dpo"], "stage dpo needs a preference dataset"),
    ],
)
def test_cli_bad_input_exit_2(
    tiny: Path, datadir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    args: list[str], message: str,
) -> None:  # fmt: skip
    base = ["--stage", "sft", "--do_train", "--model_name_or_path", str(tiny), "--dataset_dir", str(datadir),
            "--output_dir", str(tmp_path / "o"), "--template", "qwen-2.5", "--dataset", "identity"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["exporter", "train", *base, *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_cli_debug_prints_the_traceback(tiny: Path, datadir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """--debug: the error's traceback and exit code 1, as Python prints an uncaught one (printed by exporter, which
    keeps nothing of it to exit)."""
    monkeypatch.setattr(sys, "argv", ["exporter", "--debug", "train", "--model_name_or_path", str(tiny),
                                      "--dataset_dir", str(datadir), "--dataset", "nope",
                                      "--output_dir", str(tmp_path / "o")])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UserError: dataset 'nope' is not defined" in err


def test_cli_subprocess_yaml_missing_file(tmp_path: Path, datadir: Path, tiny: Path) -> None:
    d = tmp_path / "d"
    shutil.copytree(datadir, d)
    (d / "identity.json").unlink()
    yml = tmp_path / "c.yaml"
    yml.write_text(f"model_name_or_path: {tiny}\ndataset: identity\ndataset_dir: {d}\noutput_dir: {tmp_path / 'o'}\n")
    r = subprocess.run([sys.executable, "-m", "exporter", "train", str(yml)], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"dataset 'identity': file {d / 'identity.json'} not found" in r.stderr


# ------------------------------------------------------------------ the demo

DEMO = dict(  # the settings the demo pipeline uses (reported to the lead): 3/3 seeds learn it on the qwen2 fixture
    finetuning_type="lora", lora_rank=32, lora_target=["all"], learning_rate=2e-3, num_train_epochs=40,
    max_steps=-1, per_device_train_batch_size=4, lr_scheduler_type="cosine", warmup_ratio=0.0, logging_steps=10,
    disable_gradient_checkpointing=True,
)  # fmt: skip


def _greedy(model, tok, question: str) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)  # fmt: skip
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        g = model.generate(**ids, max_new_tokens=40, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    return tok.decode(g[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_identity_demo(tiny: Path, datadir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert "Exa" not in _greedy(base, tok, "who are you")
    out = tmp_path / "identity"
    T.train(_cfg(tiny, datadir, out, **DEMO))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
    tok = AutoTokenizer.from_pretrained(out)
    answer = _greedy(tuned, tok, "who are you")
    assert "Exa" in answer and "Acme" in answer, answer


def test_lora_options_and_sft_packing(tiny: Path, datadir: Path, tmp_path: Path) -> None:
    out = tmp_path / "opts"
    cfg = _cfg(tiny, datadir, out, dataset=["count"], max_steps=2, use_dora=True, use_rslora=True, lora_rank=4,
               lora_target=["q_proj", "v_proj"], loraplus_lr_ratio=16.0, packing=True, cutoff_len=64)  # fmt: skip
    T.train(cfg)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_dora"] and adapter["use_rslora"] and adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    model = tuning.load_model(cfg, tiny, "cpu")
    lrs = {g["lr"]: len(g["params"]) for g in tuning.make_optimizer(model, cfg).param_groups}
    assert set(lrs) == {1e-3, 16e-3}  # LoRA+: B matrices (and DoRA magnitudes) at lr * ratio
    with pytest.raises(UserError, match=r"lora_target 'qproj': no linear layer .*did you mean 'q_proj'"):
        tuning.load_model(dataclasses.replace(cfg, lora_target=["qproj"]), tiny, "cpu")


@pytest.mark.parametrize(("family", "fast"), [("qwen2", True), ("gemma2", True), ("granite", False)])
def test_fast_path_only_where_it_equals_the_models_own_logits(tiny_model, family: str, fast: bool) -> None:
    """The output head on the trained positions only (gemma2: with its logit soft-cap) is used where it gives the
    loss the model's own logits give; granite divides its logits by `logits_scaling`, which the fast path does not:
    its loss comes from the model's own forward, and equals transformers' own loss. The scorer keeps the path found."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(family), dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (2, 12))
    index = torch.cat([torch.arange(5, 11), 12 + torch.arange(5, 11)])  # each row's positions 5..10 predict a token
    labels = torch.full((24,), -100)
    labels[index + 1] = ids.flatten()[index + 1]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(12).repeat(2, 1),
             "index": index, "target": ids.flatten()[index + 1], "rows": index // 12, "n_trained": 12}  # fmt: skip
    score = tuning.scorer(model)
    score.fast = tuning.fast_path_ok(score, batch)
    assert score.fast is fast
    with torch.no_grad():
        ours = tuning.loss_sum(score, batch) / 12
        ref = model(input_ids=ids, labels=labels.view(2, 12)).loss
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5), (ours, ref)
