"""exporter verify: passes on a good export, FAILS naming the cause on each deliberately broken one.

The good export: the qwen2 fixture with sharpened attention (so RoPE matters), our templates written into it, GGUF
f16 + q8_0 + Modelfiles from the gguf stage. Each broken export changes exactly one thing (gguf-py rewrites for GGUF
metadata/tensors). References: HF transformers (logits, tokenizer, Jinja) and llama.cpp (via llama-cpp-python).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FAMILIES, TEMPLATE_OF, require_go, require_llama_cpp, require_quant
from export_edits import rewrite_gguf, sharpen_attention, sharpened_export

from exporter import verify as V
from exporter.errors import UserError
from exporter.verify import report as verify_report

FAST = {"prompts": 2, "max_new_tokens": 8, "ctx": 64, "max_windows": 3}


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """A faithful export of the qwen2 fixture: merged dir, f16 + q8_0 GGUFs, their Modelfiles."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("verify")
    merged, tpl, res = sharpened_export(tiny_model("qwen2"), root, ["f16", "q8_0"])
    return SimpleNamespace(
        root=root,
        merged=merged,
        tpl=tpl,
        f16=res.files["f16"],
        q8=res.files["q8_0"],
        mf16=res.modelfiles["f16"],
        mq8=res.modelfiles["q8_0"],
    )


def _failed(report: verify_report.Report) -> dict[tuple[str, str], str]:
    return {(c.check, c.target): c.detail for c in report.failures}


def test_good_export_passes(good, tmp_path: Path) -> None:
    rep = V.verify(
        V.VerifyOptions(
            merged=good.merged,
            ggufs=[good.f16, good.q8],
            modelfiles=[good.mf16, good.mq8],
            template="qwen-2.5",
            **FAST,
        )
    )
    assert rep.passed, _failed(rep)
    kinds = {c.check for c in rep.checks if c.status == "pass"}
    assert {"stops", "tokenizer", "perplexity", "chat", "metadata", "modelfile"} <= kinds
    ppl = {c.target: c.metrics for c in rep.checks if c.check == "perplexity"}
    assert ppl[good.f16.name]["rel_diff"] <= 0.001 and ppl[good.f16.name]["type"] == "f16"
    chat = next(c for c in rep.checks if c.check == "chat" and c.target == good.f16.name)
    assert chat.metrics["exact"] + chat.metrics["near_ties"] == FAST["prompts"]
    # report.json and JUnit
    verify_report.write_json(rep, tmp_path / "report.json")
    verify_report.write_junit(rep, tmp_path / "junit.xml")
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["schema"] == "exporter.verify/1" and doc["passed"] is True
    assert doc["summary"]["fail"] == 0 and len(doc["checks"]) == len(rep.checks)
    assert doc["artifacts"]["template"] == "qwen-2.5"
    xml = (tmp_path / "junit.xml").read_text()
    assert "<failure" not in xml and f'tests="{len(rep.checks)}"' in xml


def _only_failures(rep: verify_report.Report, expected_checks: set[str], target: str, *needles: str) -> str:
    """Assert the report failed, only in `expected_checks` of `target`, and the details name the cause."""
    fails = _failed(rep)
    assert not rep.passed
    assert fails, "expected failures"
    assert {t for _, t in fails} == {target}, fails
    assert {c for c, _ in fails} <= expected_checks, fails
    text = " | ".join(fails.values())
    for n in needles:
        assert n in text, text
    return text


def test_go_template_differs(good, tmp_path: Path) -> None:
    require_go()
    mf = tmp_path / "Modelfile.f16"
    (tmp_path / good.f16.name).symlink_to(good.f16)  # its FROM, so only the TEMPLATE differs
    text = good.mf16.read_text()
    assert "<|im_start|>assistant\n" in text
    mf.write_text(text.replace("<|im_start|>assistant\n", "<|im_start|>assistant \n"))
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[good.f16], modelfiles=[mf], template="qwen-2.5", **FAST))
    _only_failures(rep, {"template"}, mf.name, "TEMPLATE (Go)", "differ at char")


def test_missing_stop_line(good, tmp_path: Path) -> None:
    mf = tmp_path / "Modelfile.f16"
    (tmp_path / good.f16.name).symlink_to(good.f16)  # its FROM, so only the stop line differs
    lines = good.mf16.read_text().splitlines(keepends=True)
    mf.write_text("".join(ln for ln in lines if ln.strip() != 'PARAMETER stop "<|im_end|>"'))
    assert mf.read_text() != good.mf16.read_text()
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[good.f16], modelfiles=[mf], template="qwen-2.5", **FAST))
    _only_failures(rep, {"stops"}, mf.name, "no PARAMETER stop for <|im_end|>")


def test_gguf_without_eog_id(good, tmp_path: Path) -> None:
    info = V.read_gguf(good.f16)
    im_end = info.tokens.index("<|im_end|>")
    other = info.tokens.index("<|endoftext|>")
    declared = [f"tokenizer.ggml.{k}_token_id" for k, v in info.eog_ids.items() if v == im_end]
    assert declared, info.eog_ids
    bad = rewrite_gguf(
        good.f16,
        tmp_path / good.f16.name,
        kv={"tokenizer.ggml.eos_token_id": other},
        # tokenizer.ggml.eos_token_ids (Ollama's stop ids) declares it too
        drop=(*(k for k in declared if k != "tokenizer.ggml.eos_token_id"), "tokenizer.ggml.eos_token_ids"),
    )
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[bad], template="qwen-2.5", **FAST))
    _only_failures(rep, {"stops", "chat"}, bad.name, "<|im_end|>", "not declared end-of-generation")


def test_gguf_eos_is_an_ordinary_token(good, tmp_path: Path) -> None:
    """Generation would stop at an ordinary text token: the stops check fails and names it (and the eos id)."""
    from gguf import TokenType

    info = V.read_gguf(good.f16)
    word = next(i for i, (t, k) in enumerate(zip(info.tokens, info.token_types, strict=True))
                if k == TokenType.NORMAL and t.isalpha() and len(t) > 3)  # fmt: skip
    bad = rewrite_gguf(good.f16, tmp_path / good.f16.name, kv={"tokenizer.ggml.eos_token_id": word})
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[bad], template="qwen-2.5", **FAST))
    detail = _failed(rep)[("stops", bad.name)]
    name = f"{info.tokens[word]!r} ({word})"
    assert f"eos id is {name}, not an end-of-turn or eos token" in detail
    assert f"{name}, an ordinary text token, ends generation" in detail
    # the good file's EOG set is exactly the expected one (llama.cpp's own by-name picks reported, not failed)
    good_rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[good.f16], template="qwen-2.5", **FAST))
    good_stops = next(c for c in good_rep.checks
                      if c.check == "stops" and c.target == good.f16.name)  # fmt: skip
    assert good_stops.status == "pass" and "exactly '<|im_end|>'" in good_stops.detail


def test_gguf_bos_changed(tiny_model, tmp_path: Path) -> None:
    """A GGUF whose bos id is another token than the HF tokenizer's fails the stops check, naming both."""
    from transformers import AutoTokenizer

    from exporter import gguf, templates
    from exporter.verify.artifacts import gen_eos
    from exporter.verify.stops import check_stops, eot_ids

    model = tiny_model("llama3")
    tpl = templates.resolve(model, None)
    res = gguf.export(model, ["f16"], tpl, tmp_path / "gguf")
    tok = AutoTokenizer.from_pretrained(model)
    other = tok.convert_tokens_to_ids("<|reserved_special_token_0|>")
    bad = rewrite_gguf(res.files["f16"], tmp_path / "bad.gguf", kv={"tokenizer.ggml.bos_token_id": other})
    eot = eot_ids(tok, tpl, [])
    stops = gen_eos(model) or []  # generation_config's eos ids are EOG in the GGUF too
    (good_check,) = check_stops(eot, None, [V.read_gguf(res.files["f16"])], [], tok, stops)
    (bad_check,) = check_stops(eot, None, [V.read_gguf(bad)], [], tok, stops)
    assert good_check.status == "pass", good_check.detail
    assert bad_check.status == "fail"
    assert f"bos id is '<|reserved_special_token_0|>' ({other}), the HF tokenizer's is '<|begin_of_text|>'" in (
        bad_check.detail
    )


def test_one_tensor_perturbed(good, tmp_path: Path) -> None:
    name = "blk.0.attn_v.weight"

    def perturb(n: str, a: np.ndarray) -> np.ndarray:
        if n != name:
            return a
        rng = np.random.default_rng(0)
        return (a.astype(np.float32) + rng.normal(0, float(np.abs(a).std()) * 2, a.shape)).astype(a.dtype)

    bad = rewrite_gguf(good.f16, tmp_path / good.f16.name, tensor=perturb)
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[bad], template="qwen-2.5", **FAST))
    text = _only_failures(rep, {"perplexity", "chat"}, bad.name)
    assert ("perplexity", bad.name) in _failed(rep), text


def test_wrong_rope_theta(good, tmp_path: Path) -> None:
    key = "qwen2.rope.freq_base"
    assert V.read_kv(good.f16)[key] == pytest.approx(1_000_000.0)
    bad = rewrite_gguf(good.f16, tmp_path / good.f16.name, kv={key: 10_000.0})
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[bad], template="qwen-2.5", **FAST))
    _only_failures(rep, {"perplexity", "chat"}, bad.name, "ppl")
    assert ("perplexity", bad.name) in _failed(rep)


def test_wrong_pre_tokenizer(good, tmp_path: Path) -> None:
    bad = rewrite_gguf(good.f16, tmp_path / good.f16.name, kv={"tokenizer.ggml.pre": "gpt-2"})
    rep = V.verify(V.VerifyOptions(merged=good.merged, ggufs=[bad], template="qwen-2.5", **FAST))
    _only_failures(rep, {"tokenizer", "chat"}, bad.name, "tokenize differently", "tokenizer.ggml.pre='gpt-2'")


def test_end_of_turn_token_of_ordinary_type_fails(good, tmp_path: Path) -> None:
    """<|im_end|> stored as an ordinary text token (llama.cpp would print it and not parse it in prompts): the stops
    check of that GGUF fails naming its type."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    from exporter.verify.artifacts import gen_eos
    from exporter.verify.stops import check_stops, eot_ids

    info = V.read_gguf(good.f16)
    types = list(info.token_types)
    im_end = info.tokens.index("<|im_end|>")
    types[im_end] = int(TokenType.NORMAL)
    bad = rewrite_gguf(good.f16, tmp_path / good.f16.name, kv={"tokenizer.ggml.token_type": types})
    tok = AutoTokenizer.from_pretrained(good.merged)
    eot = eot_ids(tok, good.tpl, [])
    stops = gen_eos(good.merged) or []  # generation_config's eos ids are EOG in the GGUF too
    (good_check,) = check_stops(eot, None, [info], [], tok, stops)
    (bad_check,) = check_stops(eot, None, [V.read_gguf(bad)], [], tok, stops)
    assert good_check.status == "pass", good_check.detail
    assert bad_check.status == "fail" and f"<|im_end|> ({im_end}) has token type NORMAL, expected CONTROL" in (
        bad_check.detail
    ), bad_check.detail


def test_tokenizer_check_compares_ids_not_just_counts(good, tmp_path: Path) -> None:
    """Two frequent tokens' texts swapped in the GGUF vocabulary: every text gives as many tokens as HF's, with other
    ids; the tokenizer check fails."""
    from collections import Counter

    from gguf import TokenType
    from transformers import AutoTokenizer

    from exporter.verify.corpus import TOKENIZER_CORPUS
    from exporter.verify.tokenizer import check_tokenizer

    tok = AutoTokenizer.from_pretrained(good.merged)
    info = V.read_gguf(good.f16)
    counts = Counter(i for text in TOKENIZER_CORPUS for i in tok(text)["input_ids"])
    a, b = [i for i, _ in counts.most_common() if info.token_types[i] == TokenType.NORMAL][:2]
    tokens = list(info.tokens)
    tokens[a], tokens[b] = tokens[b], tokens[a]
    bad = rewrite_gguf(good.f16, tmp_path / good.f16.name, kv={"tokenizer.ggml.tokens": tokens})
    (good_check,) = check_tokenizer(tok, [info], [], [])
    (bad_check,) = check_tokenizer(tok, [V.read_gguf(bad)], [], [])
    assert good_check.status == "pass", good_check.detail
    assert bad_check.status == "fail" and "tokenize differently" in bad_check.detail, bad_check.detail


def test_exported_chat_template_differs_from_training(good, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    for f in good.merged.iterdir():
        (merged / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, merged / f.name)
    cfg = json.loads((merged / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant\\n" in cfg["chat_template"]
    cfg["chat_template"] = cfg["chat_template"].replace("<|im_start|>assistant\\n", "<|im_start|>assistant:\\n")
    (merged / "tokenizer_config.json").write_text(json.dumps(cfg))
    rep = V.verify(V.VerifyOptions(merged=merged, template="qwen-2.5", **FAST))
    _only_failures(rep, {"template"}, "merged/tokenizer_config.json", "training template qwen-2.5", "differ at char")


def test_bad_input_exits_2(good, tmp_path: Path, monkeypatch, capsys) -> None:
    from exporter import cli

    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all, just bytes")
    monkeypatch.setattr(
        sys, "argv", ["exporter", "verify", "--gguf", str(tmp_path / "x.gguf"), "--merged", str(good.merged)]
    )
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "not a GGUF file" in capsys.readouterr().err
    with pytest.raises(UserError, match="nothing to verify"):
        V.verify(V.VerifyOptions())
    with pytest.raises(UserError, match="TYPE=FRACTION"):
        V.parse_thresholds("q8_0:0.1")


def test_cli_exit_codes_and_files(good, tmp_path: Path, monkeypatch) -> None:
    from exporter import cli

    bad = rewrite_gguf(good.f16, tmp_path / good.f16.name, kv={"tokenizer.ggml.pre": "gpt-2"})
    for gguf_file, code in ((good.f16, 0), (bad, 1)):
        out = tmp_path / f"r{code}"
        argv = [
            "exporter",
            "verify",
            "--merged",
            str(good.merged),
            "--gguf",
            str(gguf_file),
            "--template",
            "qwen-2.5",
            "--report",
            str(out / "report.json"),
            "--junit",
            str(out / "junit.xml"),
            "--prompts",
            "1",
            "--max-new-tokens",
            "4",
            "--ctx",
            "64",
            "--max-windows",
            "2",
            "--ppl-threshold",
            "f16=0.001",
        ]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code == code
        doc = json.loads((out / "report.json").read_text())
        assert doc["passed"] is (code == 0) and doc["thresholds"]["f16"] == 0.001
        ppl = next(c["metrics"] for c in doc["checks"] if c["check"] == "perplexity" and c["target"] == "merged")
        assert (ppl["ctx"], ppl["windows"], ppl["tokens"]) == (64, 2, 2 * (64 - 32 - 1))
        assert ("<failure" in (out / "junit.xml").read_text()) is (code == 1)


def test_report_never_replaces_a_user_file_and_gguf_takes_a_dir(good, tmp_path: Path, monkeypatch, capsys) -> None:
    """--report / --junit replace only an earlier verify's report, checked before any work: an input GGUF, a config.json
    or a user's notes stay as they were. --gguf and --modelfile also take a dir (the README's `--gguf out/gguf`)."""
    from exporter import cli

    gguf_copy = tmp_path / good.f16.name
    shutil.copy(good.f16, gguf_copy)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    base = ["exporter", "verify", "--merged", str(good.merged), "--prompts", "0", "--ctx", "32", "--max-windows", "1"]
    for option, target in (("--report", gguf_copy), ("--junit", notes), ("--report", good.merged / "config.json")):
        before = target.read_bytes()
        monkeypatch.setattr(sys, "argv", [*base, "--gguf", str(gguf_copy), option, str(target)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"{option} {target} exists and is not a report of exporter verify" in err, err
        assert target.read_bytes() == before
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    for _ in range(2):  # the second run replaces the first one's reports
        gguf_dir = str(good.root / "gguf")
        argv = [*base, "--gguf", gguf_dir, "--modelfile", gguf_dir, "--report", str(report), "--junit", str(junit)]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code == 0, capsys.readouterr()
    doc = json.loads(report.read_text())
    assert sorted(Path(p).name for p in doc["artifacts"]["ggufs"]) == sorted([good.f16.name, good.q8.name])
    assert sorted(Path(p).name for p in doc["artifacts"]["modelfiles"]) == sorted([good.mf16.name, good.mq8.name])
    monkeypatch.setattr(sys, "argv", [*base, "--gguf", str(tmp_path / "empty")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and "a directory with no gguf file in it" in capsys.readouterr().err


def test_parse_modelfile_and_thresholds(tmp_path: Path) -> None:
    mf = tmp_path / "Modelfile"
    mf.write_text(
        '# comment\nFROM ./m.gguf\nTEMPLATE """{{ .System }}\n{{ .Prompt }}"""\nSYSTEM "be brief"\n'
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop <|endoftext|>\nPARAMETER temperature 0.7\n'
    )
    p = V.parse_modelfile(mf)
    assert (p.from_, p.template, p.system) == ("./m.gguf", "{{ .System }}\n{{ .Prompt }}", "be brief")
    assert p.stops == ["<|im_end|>", "<|endoftext|>"]
    assert V.parse_thresholds("f16=0.002, q4_k_m=0.1") == {"f16": 0.002, "q4_k_m": 0.1}


def test_chunked_windows_match_llama_cpp_convention() -> None:
    # llama.cpp perplexity: windows of n_ctx tokens, first token replaced by BOS, score the second half
    wins = V.windows(list(range(10, 30)), 8, bos=1, max_windows=5)
    assert wins == [[1, *range(11, 18)], [1, *range(19, 26)]]
    logits = np.zeros((8, 40), dtype=np.float32)
    s = V.score(lambda w: logits, wins, None, False, lambda: None)
    assert s.tokens == 2 * (8 - 8 // 2 - 1) and s.ppl == pytest.approx(40.0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_good_export_of_every_family_passes(family: str, tiny_model, tmp_path: Path) -> None:
    require_llama_cpp()
    from exporter import gguf, spm, templates

    merged = tmp_path / "merged"
    shutil.copytree(tiny_model(family), merged)
    sharpen_attention(merged)
    tpl = templates.resolve(merged, TEMPLATE_OF[family])
    templates.write_into(merged, tpl)
    spm.fix_dir(merged)  # as merge writes it
    res = gguf.export(merged, ["f16"], tpl, tmp_path / "gguf")
    rep = V.verify(
        V.VerifyOptions(
            merged=merged, ggufs=[res.files["f16"]], modelfiles=[res.modelfiles["f16"]], template=tpl.name, **FAST
        )
    )
    assert rep.passed, _failed(rep)


def test_quantized_dirs_scored_against_merged(tiny_model, tmp_path: Path) -> None:
    """`exporter quantize` outputs: perplexity vs the merged model on the same ids, per-method thresholds."""
    import subprocess

    require_quant()
    merged = tiny_model("qwen2")
    q8 = tmp_path / "bnb8"
    r = subprocess.run(
        [sys.executable, "-m", "exporter", "quantize", str(merged), "--method", "bnb8", "--out", str(q8)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert V.quantized_kind(q8) == "bnb8"
    fast = {**FAST, "prompts": 0}
    rep = V.verify(V.VerifyOptions(merged=merged, quantized=[q8], template="qwen-2.5", **fast))
    (check,) = [c for c in rep.checks if c.check == "perplexity" and c.target == "bnb8"]
    assert check.status == "pass" and check.metrics["type"] == "bnb8" and check.metrics["threshold"] == 0.01
    assert 0 < check.metrics["rel_diff"] <= 0.01  # int8 moves perplexity, a little
    strict = V.verify(
        V.VerifyOptions(merged=merged, quantized=[q8], template="qwen-2.5", ppl_threshold={"bnb8": 0.0}, **fast)
    )
    assert not strict.passed and [c.target for c in strict.checks if c.status == "fail"] == ["bnb8"]
    with pytest.raises(UserError, match="--quantized needs --merged"):
        V.verify(V.VerifyOptions(quantized=[q8], ggufs=[], modelfiles=[], adapter=None, template="qwen-2.5"))
    with pytest.raises(UserError, match="no quantization_config"):
        V.verify(V.VerifyOptions(merged=merged, quantized=[merged], template="qwen-2.5", **fast))
