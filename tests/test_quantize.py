"""exporter quantize: GPTQ/AWQ (gptqmodel) and bnb nf4/int8 outputs reload with plain transformers in a fresh process
and stay close to the source; calibration is the chat-template rendering of the data, packed, deterministic; bad
input is a one-line error with nothing written.

The quantization tests need the optional `[quant]` extra: they skip without it, and FAIL when
EXPORTER_REQUIRE_QUANT=1 (CI).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAMILIES, TEMPLATE_OF, require_quant

from exporter import calibration, hf_dir, templates
from exporter.errors import UserError
from exporter.quantize import QuantizeOptions, check_shapes, linear_shapes, quantize

HERE = Path(__file__).resolve().parent
METHODS = ("gptq", "awq", "bnb4", "bnb8")
N_CTX = 128
# Held-out text (not in the calibration set) for perplexity and logits.
HELD_OUT = (
    "The museum reopened on Saturday after two years of renovation. Visitors queued in the rain to see the restored "
    "ceiling paintings, which had been cleaned with soft brushes and distilled water, one square metre at a time. "
    "The curator explained that the original pigments, ground from lapis lazuli and ochre, had survived better than "
    "anyone expected, while the varnish added in the nineteenth century had turned almost brown. "
    "小镇的火车站每天只有四趟列车经过，站长在这里工作了三十年，认识每一位常来的乘客。"
    "下雪的时候，他会提前把站台上的积雪扫干净，再在候车室里生起炉子，给等车的人烧一壶热茶。 "
    "def median(values):\n    s = sorted(values)\n    n = len(s)\n    if n == 0:\n        raise ValueError('empty')\n"
    "    mid = n // 2\n    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2\n\n"
    "Weather report: tomorrow will start cloudy with a light north-westerly wind of 15 km/h, temperatures between "
    "4 and 11 degrees, and a 60 percent chance of showers in the afternoon, clearing by evening. "
    "Las montañas del norte reciben la primera nieve del invierno a finales de octubre, y los pastores bajan el "
    "ganado a los valles antes de que los caminos se cierren. "
) * 3


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def _alpaca_dir(tmp: Path, rows: list[dict]) -> Path:
    d = tmp / "data"
    d.mkdir()
    (d / "calib.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps({"calib": {"file_name": "calib.json"}}), encoding="utf-8")
    return d


def _rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Question {i}: explain topic number {i} in a few sentences.", "input": "",
         "output": f"Answer {i}. " + "Some explanation of the topic with numbers 1 2 3 and words. " * (2 + i % 5)}
        for i in range(n)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Options, shapes, missing extra: no quantization library needed.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "gptx"}, r"unknown --method 'gptx' \(did you mean 'gptq'\?\)"),
        ({"method": "awq", "bits": 8}, r"--bits 8 is not supported by --method awq .*AWQ is 4-bit only"),
        ({"method": "bnb4", "bits": 8}, r"--bits 8 is not supported by --method bnb4"),
        ({"method": "gptq", "bits": 3}, r"--bits 3 is not supported by --method gptq \(supported: \(4, 8\)\)"),
        ({"method": "bnb8", "dataset": "x"}, r"--dataset do nothing with --method bnb8"),
        ({"method": "bnb4", "group_size": 64}, r"--group-size do nothing with --method bnb4"),
        ({"method": "gptq", "group_size": 100}, r"--group-size 100 is not supported for gptq"),
        ({"method": "awq", "group_size": 256}, r"--group-size 256 is not supported for awq"),
    ],
)
def test_bad_options(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        quantize(QuantizeOptions(model=str(tmp_path), out=str(tmp_path / "out"), **kw))
    assert not (tmp_path / "out").exists()


def test_missing_extra_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "gptqmodel" else real("json" if n == "optimum" else n, *a),
    )  # only gptqmodel missing, whatever this venv has
    with pytest.raises(
        UserError, match=r"--method gptq needs gptqmodel, not installed: pip install 'exporter\[quant\]'"
    ):
        quantize(QuantizeOptions(model=str(tmp_path), method="gptq", out=str(tmp_path / "o")))


def test_group_size_must_divide_in_features(tiny_model, tmp_path: Path) -> None:
    shapes = linear_shapes(tiny_model("llama3"))
    assert shapes["model.layers.0.mlp.down_proj"][1] % 256 == 0  # the fixture's intermediate size
    check_shapes(shapes, "gptq", 128)  # fine
    odd = {**shapes, "model.layers.1.mlp.down_proj": (256, 688)}
    with pytest.raises(UserError) as e:
        check_shapes(odd, "gptq", 128)
    msg = str(e.value)
    assert msg.startswith("layer model.layers.1.mlp.down_proj: in_features 688 is not divisible by --group-size 128")
    assert msg.endswith("group sizes that divide every layer of this model: -1, 16")
    with pytest.raises(UserError, match=r"layer model.layers.0.x: out_features 250 is not a multiple of 8"):
        check_shapes({"model.layers.0.x": (250, 256)}, "awq", 128)


def test_calibration_dataset_neither_file_nor_name_is_named(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --dataset that is a directory, a missing file or an unknown name: one line naming the value and the flag,
    before the model is loaded (it used to be `dataset_dir data: no dataset_info.json`)."""
    require_quant()
    monkeypatch.chdir(tmp_path)
    src = str(tiny_model("llama3"))
    cases = {
        str(tmp_path): f"--dataset {tmp_path}: a directory; give a file of raw `text` rows or dataset names",
        "nosuch.jsonl": "--dataset nosuch.jsonl: no such file, and no data/dataset_info.json to look it up in as a "
        "dataset name",
    }
    for value, message in cases.items():
        with pytest.raises(UserError, match="^" + re.escape(message)):
            quantize(QuantizeOptions(model=src, method="gptq", out=str(tmp_path / "o"), dataset=value))
    _alpaca_dir(tmp_path, _rows(2))
    with pytest.raises(UserError, match=r"^--dataset calb: no such file, and dataset 'calb' is not defined in "
                                        r"data/dataset_info.json \(did you mean 'calib'\?\)$"):  # fmt: skip
        quantize(QuantizeOptions(model=src, method="gptq", out=str(tmp_path / "o"), dataset="calb"))
    assert not list(tmp_path.glob("o*"))


# ---------------------------------------------------------------------------------------------------------------
# Calibration: rendered through the chat template (HF apply_chat_template is the reference), packed, seeded.
# ---------------------------------------------------------------------------------------------------------------


def _tok_tpl(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)), templates.resolve(path, None)


def test_pack_keeps_every_token_and_cuts_blocks() -> None:
    seqs = [[1, 2, 3], [4, 5, 9], [6] * 10]
    blocks, used = calibration.pack(iter(seqs), 9, 4, 100)
    assert used == 3
    assert [t for b in blocks for t in b] == [1, 2, 3, 9, 4, 5, 9] + [6] * 10 + [9]  # EOS added unless present
    assert [len(b) for b in blocks] == [4, 4, 4, 4, 2]  # short tail kept: fewer than 100 full blocks exist
    blocks, used = calibration.pack(iter(seqs), 9, 4, 2)
    assert blocks == [[1, 2, 3, 9], [4, 5, 9, 6]] and used == 3
    blocks, _ = calibration.pack(iter([[1, 7, 13], [2, 3]]), 9, 100, 1, enders=frozenset({7}))
    assert blocks == [[1, 7, 13, 2, 3, 9]]  # an end-of-turn token followed by a newline already ends a sequence


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_dataset_calibration_is_the_chat_template_rendering(tiny_model, tmp_path: Path, family: str) -> None:
    src = tiny_model(family)
    tok, tpl = _tok_tpl(src)
    assert tpl.name == TEMPLATE_OF[family]
    rows = _rows(30)
    d = _alpaca_dir(tmp_path, rows)
    cal = calibration.build(tok, tpl, "calib", d, samples=1000, max_length=64, seed=3)
    assert cal.rows_used == cal.rows_total == 30 and not cal.rejected
    # reference: HF apply_chat_template with the family's Jinja, rows in the seeded order, joined with EOS
    stream: list[int] = []
    order = list(range(30))
    import random

    random.Random(3).shuffle(order)
    for i in order:
        r = rows[i]
        msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        text = tok.apply_chat_template(msgs, chat_template=tpl.jinja, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and ids[0] != tok.bos_token_id and hf_dir.adds_bos(tok):
            ids = [tok.bos_token_id] + ids
        ended = {tok.eos_token_id, *tok.convert_tokens_to_ids(list(tpl.eot_tokens))} & set(ids[-2:])
        stream += ids + ([] if ended else [tok.eos_token_id])
    assert [t for b in cal.blocks for t in b] == stream
    assert all(len(b) == 64 for b in cal.blocks[:-1]) and 0 < len(cal.blocks[-1]) <= 64
    # deterministic per seed
    again = calibration.build(tok, tpl, "calib", d, samples=1000, max_length=64, seed=3)
    other = calibration.build(tok, tpl, "calib", d, samples=1000, max_length=64, seed=4)
    assert again.blocks == cal.blocks and other.blocks != cal.blocks


def test_sharegpt_dataset_and_unknown_name(tiny_model, tmp_path: Path) -> None:
    tok, tpl = _tok_tpl(tiny_model("qwen3"))
    d = tmp_path / "data"
    d.mkdir()
    conv = [{"from": "human", "value": "Hi, how are you today?"}, {"from": "gpt", "value": "Fine, thanks! " * 20}]
    rows = [{"conversations": conv}] * 40 + [{"conversations": conv[:1]}]  # the last row has no answer
    (d / "sg.json").write_text(json.dumps(rows), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps({"sg": {"file_name": "sg.json", "formatting": "sharegpt"}}))
    cal = calibration.build(tok, tpl, "sg", d, samples=4, max_length=128, seed=0)
    assert len(cal.blocks) == 4 and cal.rows_total == 41 and sum(cal.rejected.values()) == 1
    msgs = [{"role": "user", "content": conv[0]["value"]}, {"role": "assistant", "content": conv[1]["value"]}]
    ref = tok(tok.apply_chat_template(msgs, chat_template=tpl.jinja, tokenize=False), add_special_tokens=False)
    assert [t for b in cal.blocks for t in b][: len(ref["input_ids"])] == ref["input_ids"]
    with pytest.raises(UserError, match=r"dataset 'sq' is not defined in .*dataset_info.json"):
        calibration.build(tok, tpl, "sq", d, samples=4, max_length=128, seed=0)


def test_default_calibration_is_multilingual_and_enough(tiny_model) -> None:
    tok, tpl = _tok_tpl(tiny_model("qwen2"))
    cal = calibration.build(tok, tpl, None, None, samples=16, max_length=256, seed=0)
    assert len(cal.blocks) == 16 and all(len(b) == 256 for b in cal.blocks)
    text = tok.decode([t for b in cal.blocks for t in b])
    assert re.search(r"[\u4e00-\u9fff]{4}", text) and "def " in text and "The " in text  # Chinese, code, English
    assert "<|im_end|>\n<|im_end|>" not in text  # a turn that ends with <|im_end|>\n needs no extra EOS


def test_too_small_calibration_says_what_was_found_and_rejected(tiny_model, tmp_path: Path) -> None:
    tok, tpl = _tok_tpl(tiny_model("llama3"))
    rows = _rows(3) + [{"instruction": "no answer", "input": "", "output": None}] * 2
    d = _alpaca_dir(tmp_path, rows)
    with pytest.raises(UserError) as e:
        calibration.build(tok, tpl, "calib", d, samples=128, max_length=512, seed=0)
    msg = str(e.value)
    assert msg.startswith("calibration set too small: dataset calib from ")
    assert "from 3 usable rows (of 5), need at least 4096 (8 blocks of --max-length 512)" in msg
    assert "rejected: 2 rows: dataset: " in msg


# ---------------------------------------------------------------------------------------------------------------
# verify's perplexity (llama.cpp's chunked method), used on quantized dirs; reference = transformers' own loss.
# ---------------------------------------------------------------------------------------------------------------


def test_perplexity_matches_transformers_loss_on_second_halves(tiny_model) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.verify import numbers

    src = tiny_model("llama3")
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = tok(HELD_OUT)["input_ids"][: 3 * 64 + 17]
    model = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    wins = numbers.windows(ids, 64, tok.bos_token_id if hf_dir.adds_bos(tok) else None, 10)
    ppl = numbers.score(numbers.hf_logits(model), wins, None, False, lambda: None).ppl
    losses = []
    for c in range(3):  # the 17-token tail is not a full chunk and is not scored
        chunk = torch.tensor([ids[c * 64 : (c + 1) * 64]])
        chunk[0, 0] = tok.bos_token_id  # llama3's tokenizer adds BOS: each chunk starts with it
        labels = chunk.clone()
        labels[0, :33] = -100  # HF shifts labels: positions 32..62 predict tokens 33..63
        with torch.no_grad():
            losses.append(model(chunk, labels=labels).loss.item())
    assert len(wins) == 3 and ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Every fixture family x method: quantize here, reload in a fresh process with plain transformers.
# ---------------------------------------------------------------------------------------------------------------

# Relative L2 distance of the logits to the source's; measured on these random-weight fixtures (the table printed
# with -s): 8-bit 0.002-0.034, 4-bit 0.003-0.32 (olmo2 highest). Random weights are a hard case for 4-bit.
LOGITS_REL = {"gptq": 0.35, "awq": 0.35, "bnb4": 0.35, "bnb8": 0.06}
PPL_REL = {"gptq": 0.10, "awq": 0.10, "bnb4": 0.10, "bnb8": 0.01}  # the defaults: 4-bit 10 %, 8-bit 1 %
# Where a random fixture's perplexity (2e6 for gemma2, 4e8-6e8 for smollm3) moves further at 4 bits; the fixtures'
# random weights change with their build hash, measured on two builds: gemma2 bnb4 +11.3 % / -0.4 %, awq +11.5 % /
# +3.1 %; olmo2 awq -18.9 % / -6.2 %; smollm3 awq +27.3 % / +21.7 % (0.7-2.5 % of the log-perplexity)
PPL_REL_WIDER = {("gemma2", "bnb4"): 0.15, ("gemma2", "awq"): 0.15, ("olmo2", "awq"): 0.25, ("smollm3", "awq"): 0.35}


# gptqmodel 7.6.0 fails there (Phi-3, GLM-4), and no method quantizes MoE experts into a dir transformers reloads
# intact; we say so up front (tested)
BROKEN_CASES = {("phi3", "awq"), ("phi3", "gptq"), ("glm4", "awq"), ("glm4", "gptq")}
BROKEN_CASES |= {(f, m) for f in ("qwen3_moe", "mixtral") for m in METHODS}
QUANTIZED_CASES = [(f, m) for f in FAMILIES for m in METHODS if (f, m) not in BROKEN_CASES]


_QUANTIZE_ALL = """
import json, sys, time
from exporter.quantize import QuantizeOptions, quantize
seconds = {}
for job in json.load(open(sys.argv[1])):
    key = job.pop("key")
    t = time.perf_counter()
    quantize(QuantizeOptions(**job))
    seconds[key] = round(time.perf_counter() - t, 2)
open(sys.argv[2], "w").write(json.dumps(seconds))
"""


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory) -> dict:
    """All families x methods quantized in one child process (gptqmodel's import-time patches and worker threads
    stay out of the test process), then reloaded and scored in ONE other fresh process."""
    require_quant()
    root = tmp_path_factory.mktemp("quantized")
    dirs, jobs = {}, []
    for fam, m in QUANTIZED_CASES:
        src = tiny_model(fam)
        out = root / f"{fam}-{m}"
        kw = {"samples": 8, "max_length": 128} if m in ("gptq", "awq") else {}
        jobs.append({"key": f"{fam}-{m}", "model": str(src), "method": m, "out": str(out), **kw})
        dirs[(fam, m)] = (src, out)
    (root / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    args = [sys.executable, "-c", _QUANTIZE_ALL, str(root / "jobs.json"), str(root / "seconds.json")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=2400)  # 840 s measured under load 9 on 2 cores
    assert r.returncode == 0, r.stderr[-4000:]
    seconds = {tuple(k.split("-")): v for k, v in json.loads((root / "seconds.json").read_text()).items()}
    spec = {
        "n_ctx": N_CTX,
        "cases": [
            {"key": f"{f}-{m}", "source": str(s), "quantized": str(o), "text": HELD_OUT}
            for (f, m), (s, o) in dirs.items()
        ],
    }
    (root / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, str(HERE / "_quant_reload.py"), str(root / "spec.json"), str(root / "result.json")],
        capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads((root / "result.json").read_text(encoding="utf-8"))
    report = ["family   method  seconds  logits_rel  ppl_src    ppl_q    ppl_rel"]
    for (f, m), _ in dirs.items():
        x = results[f"{f}-{m}"]
        if "error" in x:
            report.append(f"{f:8} {m:6} {seconds[(f, m)]:8.1f} reload failed: {x['error'][:200]}")
            continue
        rel = x["ppl_quantized"] / x["ppl_source"] - 1
        report.append(
            f"{f:8} {m:6} {seconds[(f, m)]:8.1f} {x['logits_rel']:10.4f} {x['ppl_source']:8.2f} "
            f"{x['ppl_quantized']:8.2f} {rel:+8.4f}"
        )
    print("\n".join(report))
    return {"dirs": dirs, "results": results}


def _tensor_bytes(path: Path, prefixes: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if any(name.startswith(p + ".") for p in prefixes):
                    t = sf.get_slice(name)
                    n = math.prod(t.get_shape())
                    total += n * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "U8": 1, "I8": 1, "I64": 8}[t.get_dtype()]
    return total


@pytest.mark.parametrize(("family", "method"), sorted(BROKEN_CASES))
def test_refused_up_front(tiny_model, family: str, method: str, tmp_path: Path) -> None:
    """What gptqmodel / bitsandbytes cannot quantize into a dir transformers reloads intact is refused before any work,
    naming the method and the architecture; nothing is written."""
    require_quant()
    why = "(MoE experts)" if family in ("qwen3_moe", "mixtral") else "gptqmodel 7.6.0"
    with pytest.raises(UserError, match=rf"^--method {method} cannot quantize model_type '{family}'") as e:
        quantize(QuantizeOptions(model=str(tiny_model(family)), method=method, out=str(tmp_path / "o")))
    assert why in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("o*"))


def test_cli_refuses_moe_in_one_line(tiny_model, tmp_path: Path) -> None:
    require_quant()
    r = _cli("quantize", str(tiny_model("mixtral")), "--method", "bnb4", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --method bnb4 cannot quantize model_type 'mixtral' (MoE experts)"), r.stderr
    assert "exporter gguf --type q4_k_m" in r.stderr and not list(tmp_path.glob("o*"))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method"), QUANTIZED_CASES)
def test_quantized_reloads_close_to_source(quantized, family: str, method: str, tmp_path: Path) -> None:
    src, out = quantized["dirs"][(family, method)]
    x = quantized["results"][f"{family}-{method}"]
    assert "error" not in x, x["error"]
    # loads with plain AutoModelForCausalLM in a fresh process, with quantized linear layers
    expected_method = {"gptq": "gptq", "awq": "awq", "bnb4": "bitsandbytes", "bnb8": "bitsandbytes"}[method]
    assert x["quant_method"].lower().endswith(expected_method), x
    n_linear = len(linear_shapes(src))
    assert x["quantized_modules"] == n_linear, x
    assert x["finite"]
    assert x["logits_rel"] < LOGITS_REL[method], x
    assert abs(x["ppl_quantized"] / x["ppl_source"] - 1) < PPL_REL_WIDER.get((family, method), PPL_REL[method]), x
    assert x["tokens"] >= 4 * N_CTX
    # linear-layer storage vs the 16-bit source: 4-bit about a quarter, 8-bit about a half
    prefixes = sorted(linear_shapes(src))
    ratio = _tensor_bytes(out, prefixes) / _tensor_bytes(src, prefixes)
    lo, hi = (0.45, 0.56) if method == "bnb8" else (0.24, 0.30)
    assert lo < ratio < hi, (ratio, method)
    # the directory is complete: the source's chat template byte for byte, end-of-turn eos, quantization config without
    # calibration text, manifest
    tpl = templates.resolve(src, None)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_cfg["chat_template"] == tpl.jinja
    assert (out / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    eos = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))["eos_token_id"]
    eos = [eos] if isinstance(eos, int) else eos
    for t in tpl.for_tokenizer(tok.bos_token or "", tok.eos_token or "").eot_tokens:
        assert tok.convert_tokens_to_ids(t) in eos
    qcfg = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert "dataset" not in qcfg
    # the source tokenizer is carried verbatim: same ids on the held-out text
    assert tok(HELD_OUT)["input_ids"] == AutoTokenizer.from_pretrained(str(src))(HELD_OUT)["input_ids"]
    man = json.loads((out / "exporter_manifest.json").read_text(encoding="utf-8"))
    assert man["stage"] == "quantize" and man["settings"]["method"] == method
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))


@pytest.mark.slow
def test_cli_gptq_8bit_with_dataset_and_bad_inputs(tiny_model, tmp_path: Path) -> None:
    require_quant()
    src = tiny_model("qwen3")
    d = _alpaca_dir(tmp_path, _rows(60))
    out = tmp_path / "q8"
    r = _cli("quantize", str(src), "--method", "gptq", "--bits", "8", "--dataset", "calib", "--dataset-dir", str(d),
             "--samples", "8", "--max-length", "128", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "logs").exists()  # gptqmodel's per-run logs do not land in the user's cwd
    man = json.loads((out / "exporter_manifest.json").read_text(encoding="utf-8"))
    cal = man["settings"]["calibration"]
    assert cal["source"].startswith("dataset calib from ") and cal["blocks"] == 8 and cal["tokens"] == 8 * 128
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    prefixes = sorted(linear_shapes(src))
    assert 0.45 < _tensor_bytes(out, prefixes) / _tensor_bytes(src, prefixes) < 0.56
    # existing output without --force
    r = _cli("quantize", str(src), "--method", "bnb8", "--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--force" in r.stderr
    # group size that does not divide the layers: names the layer and what works, writes nothing
    r = _cli("quantize", str(src), "--method", "gptq", "--group-size", "512", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2, r.stderr
    assert "in_features 256 is not divisible by --group-size 512" in r.stderr
    assert "group sizes that divide every layer of this model: -1, 16, 32, 64, 128, 256" in r.stderr
    assert not list(tmp_path.glob("bad*"))
    # an architecture transformers has no definition for: refused before any quantizer is imported
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in src.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "qwen3_tiny_custom"
    (odd / "config.json").write_text(json.dumps(cfg))
    r = _cli("quantize", str(odd), "--method", "awq", "--out", str(tmp_path / "bad2"))
    assert r.returncode == 2 and "config.json: transformers cannot load it" in r.stderr, r.stderr
    assert "qwen3_tiny_custom" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("bad2*"))


@pytest.mark.slow
def test_cli_max_shard_size_and_raw_text_calibration(tiny_model, tmp_path: Path) -> None:
    """--max-shard-size (merge's option) reaches the quantizer's save; a raw-text file is said to be tokenized as plain
    text, not rendered through the template."""
    require_quant()
    texts = tmp_path / "c4.jsonl"
    texts.write_text("".join(json.dumps({"text": f"row {i}: " + "the quick brown fox jumps. " * 30}) + "\n"
                             for i in range(20)))  # fmt: skip
    out = tmp_path / "q"
    r = _cli("quantize", str(tiny_model("llama3")), "--method", "gptq", "--dataset", str(texts), "--samples", "8",
             "--max-length", "32", "--max-shard-size", "400KB", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    said = " ".join(r.stderr.split())  # rich wraps the note at the terminal's width, where the tmp path's length falls
    assert f"calibration: raw text rows of {texts}, tokenized as plain text" in said, r.stderr
    assert "rendering through template" not in r.stderr
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file(), shards
    assert all(p.stat().st_size < 600_000 for p in shards), [p.stat().st_size for p in shards]
    assert json.loads((out / "exporter_manifest.json").read_text())["settings"]["max_shard_size"] == "400KB"


@pytest.mark.parametrize("stage", ["train", "merge", "gguf"])
def test_force_replaces_only_a_previous_quantize(tiny_model, tmp_path: Path, stage: str) -> None:
    """--force never replaces a training run, a merged model or a gguf output (their manifests say so)."""
    require_quant()
    other = tmp_path / stage
    (other / "checkpoint-2").mkdir(parents=True)
    (other / "exporter_manifest.json").write_text(json.dumps({"stage": stage, "outputs": []}))
    opts = QuantizeOptions(model=str(tiny_model("qwen2")), method="bnb4", out=str(other), force=True)
    with pytest.raises(UserError, match=rf"{other} is an exporter {stage} output .*only a previous quantize output"):
        quantize(opts)
    assert (other / "checkpoint-2").is_dir()
