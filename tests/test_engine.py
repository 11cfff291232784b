"""The inference engine against independent references: transformers `generate` and forward (hf), PEFT (adapter
attached), llama-cpp-python's `Llama` (gguf, GGUF LoRA), `apply_chat_template` (rendering), the families' own
Jinja (tool-call formats). Models are sharpened tiny fixtures, so greedy answers vary from token to token."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import require_llama_cpp, require_quant
from engine_models import CLEAN, POISONED, nan_gguf_rows, nan_token_model
from export_edits import sharpen_attention

from exporter.engine import EngineError, LoadOptions, NonFiniteLogits, Sampling, load, parse_tool_calls
from exporter.engine.chat_format import ChatFormat, tool_format
from exporter.engine.sampling import Sampler, TextStream

PROMPTS = ["Who are you?", "What is the capital of France?", "Write a haiku about rain.", "2+2=?", "Hi"]
N = 16


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """Sharpened qwen2 HF dir, its f16 GGUF, a random PEFT LoRA on it and that LoRA as a GGUF LoRA."""
    require_llama_cpp()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from exporter import gguf, templates

    root = tmp_path_factory.mktemp("engine")
    hf = root / "qwen2"
    shutil.copytree(tiny_model("qwen2"), hf)
    sharpen_attention(hf)
    tpl = templates.resolve(hf, None)
    f16 = gguf.export(hf, ["f16"], tpl, root / "gguf").files["f16"]
    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(hf),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)  # a random LoRA strong enough to change the answers
    peft.save_pretrained(root / "lora")
    gguf.run(gguf.GGUFOptions(str(hf), out=str(root / "lora-gguf"), adapter=str(root / "lora")))
    lora_gguf = next((root / "lora-gguf").glob("*.gguf"))
    return SimpleNamespace(hf=hf, gguf=f16, lora=root / "lora", lora_gguf=lora_gguf)


TIE = 1e-3  # top-2 logit gap under which two correct implementations may pick either token


def _hf_reference(model, prompt: list[int], stops: list[int]) -> tuple[list[int], list[float]]:
    """transformers `generate` greedy tokens and the top-2 logit gap at each step."""
    import torch

    out = model.generate(
        input_ids=torch.tensor([prompt]),
        max_new_tokens=N,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    gaps = [float(-s[0].float().topk(2).values.diff()) for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), gaps


def _agree(got: list[int], ref: list[int], gaps: list[float]) -> bool:
    """Token-exact, or the first difference is where the reference itself had a near tie."""
    if got == ref:
        return True
    i = next(k for k, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b)
    return gaps[i] < TIE


def _ids(eng) -> list[list[int]]:
    return [eng.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


def _llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        if llama_cpp.llama_vocab_is_eog(vocab, t):
            break
        llm.eval([t])
    return out


def test_hf_greedy_equals_transformers_generate_alone_and_batched(models) -> None:
    with load(LoadOptions(str(models.hf))) as eng:
        prompts = _ids(eng)
        ref = [_hf_reference(eng.backend.model, p, sorted(eng.stop_ids)) for p in prompts]
        alone = [eng.generate([p], Sampling(max_new_tokens=N))[0].token_ids for p in prompts]
        batched = [c.token_ids for c in eng.generate(prompts, Sampling(max_new_tokens=N))]
    for a, b, (r, gaps) in zip(alone, batched, ref, strict=True):
        assert _agree(a, r, gaps)
        assert _agree(b, r, gaps)  # left-padded continuous batching changes no greedy token
    assert len({tuple(r) for r, _ in ref}) > 1


def test_hf_render_and_logits_equal_transformers(models) -> None:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.hf)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 你好"}]
    with load(LoadOptions(str(models.hf))) as eng:
        assert eng.render(conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = eng.encode_chat(conv)
        assert ids == tok(eng.render(conv), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = eng.backend.model(torch.tensor([ids])).logits[0].numpy()
        assert np.array_equal(eng.logits(ids), ref)
        short = ids[: len(ids) // 2]
        nxt = eng.next_logits([ids, short])  # left-padded batch
        assert np.allclose(nxt[0], ref[-1], atol=1e-4) and np.allclose(nxt[1], ref[len(short) - 1], atol=1e-4)
        assert np.array_equal(nxt[0].argmax(), ref[-1].argmax())


def test_gguf_greedy_equals_llama_cpp_alone_and_batched(models) -> None:
    from llama_cpp import Llama

    with load(LoadOptions(str(models.gguf))) as eng:
        prompts = _ids(eng)
        alone = [eng.generate([p], Sampling(max_new_tokens=N))[0].token_ids for p in prompts]
        batched = [c.token_ids for c in eng.generate(prompts, Sampling(max_new_tokens=N))]
        # prefix cache: a finished answer's cells stay; its continuation feeds only the new tokens
        longer = prompts[0] + alone[0][:-1] + prompts[1][-3:]
        slots = range(eng.options.max_seqs)
        assert max(eng.backend.prefix(s, longer) for s in slots) >= len(prompts[0]) + len(alone[0]) - 1
        continued = eng.generate([longer], Sampling(max_new_tokens=N))[0].token_ids
        llm = Llama(model_path=str(models.gguf), n_ctx=256, logits_all=True, verbose=False)
        assert continued == _llama_greedy(llm, longer, N)
        ref = [_llama_greedy(llm, p, N) for p in prompts]
        llm.reset()
        llm.eval(prompts[0])
        assert np.array_equal(eng.logits(prompts[0]), np.array(llm.scores[: len(prompts[0])]))
        llm.close()
    assert alone == ref
    assert batched == ref
    assert len({tuple(r) for r in ref}) > 1


def test_gguf_renders_its_own_template_like_hf(models) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.hf)
    conv = [{"role": "user", "content": "Name three colours."}]
    with load(LoadOptions(str(models.gguf))) as eng:
        assert eng.render(conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert (
            eng.encode_chat(conv)
            == tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)["input_ids"]
            or eng.encode_chat(conv) == tok(eng.render(conv), add_special_tokens=False)["input_ids"]
        )
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        assert im_end in eng.stop_ids


def test_adapter_attached_equals_peft(models) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(models.hf, dtype=torch.float32)
    ref_model = PeftModel.from_pretrained(base_model, models.lora).eval()
    with load(LoadOptions(str(models.hf), adapter=str(models.lora))) as eng, load(LoadOptions(str(models.hf))) as base:
        prompts = _ids(eng)
        got = [c.token_ids for c in eng.generate(prompts, Sampling(max_new_tokens=N))]
        plain = [c.token_ids for c in base.generate(prompts, Sampling(max_new_tokens=N))]
        ref = [_hf_reference(ref_model, p, sorted(eng.stop_ids)) for p in prompts]
        with torch.no_grad():
            want = ref_model(torch.tensor([prompts[0]])).logits[0].numpy()
        assert np.allclose(eng.logits(prompts[0]), want, atol=1e-5)
    assert all(_agree(g, r, gaps) for g, (r, gaps) in zip(got, ref, strict=True))
    assert got != plain  # the adapter is really attached


def test_gguf_lora_equals_llama_cpp_lora(models) -> None:
    from llama_cpp import Llama

    with load(LoadOptions(str(models.gguf), adapter=str(models.lora_gguf))) as eng:
        prompts = _ids(eng)
        got = [c.token_ids for c in eng.generate(prompts, Sampling(max_new_tokens=N))]
    llm = Llama(model_path=str(models.gguf), lora_path=str(models.lora_gguf), n_ctx=256, logits_all=True, verbose=False)
    ref = [_llama_greedy(llm, p, N) for p in prompts]
    llm.close()
    assert got == ref


def test_stops_stop_strings_streaming_and_seeds(models) -> None:
    with load(LoadOptions(str(models.gguf))) as eng:
        p = _ids(eng)[1]
        full = eng.generate([p], Sampling(max_new_tokens=N, ignore_eos=True))[0]
        assert full.finish_reason == "length" and len(full.token_ids) == N
        k = next(i for i, t in enumerate(full.token_ids) if i >= 2 and t not in full.token_ids[:i])
        cut = eng.generate([p], Sampling(max_new_tokens=N, ignore_eos=True, stop_ids=(full.token_ids[k],)))[0]
        assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: k + 1]
        streamed = list(eng.stream(p, Sampling(max_new_tokens=N, ignore_eos=True)))
        assert "".join(d.text for d in streamed) == full.text
        assert [t for d in streamed for t in d.token_ids] == full.token_ids
        assert streamed[-1].finish_reason == "length"
        words = full.text.strip().split()
        if words:
            stop = words[len(words) // 2]
            s = eng.generate([p], Sampling(max_new_tokens=N, ignore_eos=True, stop=(stop,)))[0]
            assert s.finish_reason == "stop" and s.text == full.text[: full.text.find(stop)]
        a = eng.generate([p, p], Sampling(max_new_tokens=N, ignore_eos=True, temperature=1.5, seed=7))
        b = eng.generate([p], Sampling(max_new_tokens=N, ignore_eos=True, temperature=1.5, seed=7))
        c = eng.generate([p], Sampling(max_new_tokens=N, ignore_eos=True, temperature=1.5, seed=8))
        assert a[0].token_ids == a[1].token_ids == b[0].token_ids != c[0].token_ids
        with pytest.raises(EngineError, match="context holds"):
            eng.generate([[p[0]] * (eng.n_ctx + 1)], Sampling())
        with pytest.raises(EngineError, match="top_p"):
            eng.generate([p], Sampling(top_p=0))


def test_sampler_matches_softmax_and_greedy() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    draws = [Sampler(Sampling(temperature=1.0, seed=s), [])(logits)[0] for s in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = {Sampler(Sampling(temperature=1.0, top_k=2, seed=s), [])(logits)[0] for s in range(200)}
    assert top2 == {0, 1}
    topp = {Sampler(Sampling(temperature=1.0, top_p=0.75, seed=s), [])(logits)[0] for s in range(200)}
    assert topp == {0, 1}  # 0.5 + 0.3 reach 0.75
    assert Sampler(Sampling(), [])(logits)[0] == 0
    tok, lp = Sampler(Sampling(logprobs=2), [])(logits)
    assert lp is not None and lp.top[0][0] == 0 and abs(lp.logprob - np.log(0.5)) < 1e-5


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=1),
                                      Sampling(repetition_penalty=1.3), Sampling(temperature=1.0)])  # fmt: skip
def test_sampler_refuses_non_finite_logits(bad: float, sampling: Sampling) -> None:
    """One NaN/+inf anywhere in the row, or a row of -inf, stops the answer (top-k sampling included, where a NaN
    would otherwise fall out of the candidates); -inf on some tokens is a mask, not an error."""
    row = np.random.default_rng(0).normal(size=50).astype(np.float32)
    sampler = Sampler(sampling, [1, 2])
    sampler(row)
    masked = row.copy()
    masked[:10] = -np.inf
    sampler(masked)
    for at in (0, 17, 49):
        broken = row.copy()
        broken[at] = bad
        with pytest.raises(NonFiniteLogits, match=r"logits are not finite \((nan|inf)\) at answer token \d+"):
            Sampler(sampling, [1, 2])(broken)
    with pytest.raises(NonFiniteLogits, match=r"\(-inf\) at answer token 1:"):
        Sampler(sampling, [1, 2])(np.full(50, -np.inf, dtype=np.float32))


@pytest.fixture(scope="module")
def nan_model(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """The llama3 fixture, and its copy with NaN embedding rows for the tokens only `POISONED` holds."""
    root = tmp_path_factory.mktemp("nan")
    bad = nan_token_model(tiny_model("llama3"), root / "hf")
    return SimpleNamespace(root=root, clean=tiny_model("llama3"), hf=root / "hf", bad=bad)


def _nan_run(eng) -> tuple[list, list]:
    """Each prompt submitted at once (clean, poisoned, clean): what each request's sink received."""
    import queue

    prompts = [eng.encode_chat([{"role": "user", "content": q}]) for q in (CLEAN[0], POISONED, CLEAN[1])]
    q: queue.SimpleQueue = queue.SimpleQueue()
    for i, p in enumerate(prompts):
        eng.submit(p, Sampling(max_new_tokens=16), lambda d, i=i: q.put((i, d)))
    got: list[list] = [[], [], []]
    while not all(g and (isinstance(g[-1], Exception) or g[-1].finish_reason) for g in got):
        i, d = q.get(timeout=120)
        got[i].append(d)
    return prompts, got


@pytest.mark.parametrize("max_seqs", [1, 4])
@pytest.mark.parametrize("backend", ["hf", "gguf"])
def test_non_finite_logits_fail_that_request_only(nan_model, backend: str, max_seqs: int) -> None:
    """A prompt that makes the logits NaN fails with NonFiniteLogits (generate: `.index` names it); the requests
    batched with it or after it on its slot finish with the answers they give alone. GGUF: llama.cpp runs the NaN
    rows poked into the file (our converter refuses NaN weights)."""
    if backend == "gguf":
        require_llama_cpp()
        from exporter import gguf, templates

        path = nan_model.root / "nan.gguf"
        if not path.exists():
            tpl = templates.resolve(nan_model.clean, None)
            files = gguf.export(nan_model.clean, ["f16"], tpl, nan_model.root / "gguf").files
            files["f16"].rename(path)
            nan_gguf_rows(path, nan_model.bad)
        model = str(path)
    else:
        model = str(nan_model.hf)
    with load(LoadOptions(model, max_seqs=max_seqs)) as eng:
        prompts, got = _nan_run(eng)
        assert isinstance(got[1][-1], NonFiniteLogits) and "at answer token 1:" in str(got[1][-1])
        for i in (0, 2):
            assert got[i][-1].finish_reason in ("stop", "length")
            alone = eng.generate([prompts[i]], Sampling(max_new_tokens=16))[0].token_ids
            assert [t for d in got[i] for t in d.token_ids] == alone
        with pytest.raises(NonFiniteLogits) as e:
            eng.generate(prompts, Sampling(max_new_tokens=16))
        assert e.value.index == 1
        assert eng.generate([prompts[0]], Sampling(max_new_tokens=4))[0].token_ids  # the engine still serves


def test_text_stream_whole_characters_and_held_stop_prefix() -> None:
    pieces = {1: b"ab", 2: "你".encode()[:2], 3: "你".encode()[2:], 4: b"<", 5: b"/s> tail", 6: b"<x"}

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    ts = TextStream(decode, ["</s>"])
    assert ts.push(1) == ("ab", False)
    assert ts.push(2) == ("", False)  # half a character
    assert ts.push(3) == ("你", False)
    assert ts.push(4) == ("", False)  # may be the start of "</s>"
    assert ts.push(5) == ("", True)
    assert ts.text == "ab你"
    ts = TextStream(decode, ["</s>"])
    ts.push(4)
    assert ts.push(6) == ("<<x", False)


def test_template_override_takes_llamafactory_names() -> None:
    """--template NAME: an LF name means the Jinja LF leaves in the tokenizer (the model's own unless the LF template
    replaces it), a family its own Jinja."""
    from exporter import lf_names, templates
    from exporter.engine.core import _template_override

    special = {"bos_token": "<s>", "eos_token": "</s>"}
    own = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert _template_override("qwen", own, special) == own  # LF keeps the model's template for qwen
    generated = lf_names.for_texts("chatml", "<s>", "</s>").jinja  # chatml sets replace_jinja_template
    assert _template_override("chatml", own, special) == generated != own
    assert _template_override("qwen", None, special) == lf_names.for_texts("qwen", "<s>", "</s>").jinja
    family = templates.load_template("qwen-2.5").for_tokenizer("<s>", "</s>").jinja
    assert _template_override("qwen-2.5", own, special) == family


@pytest.mark.parametrize("family", ["qwen-2.5", "llama-3.1", "mistral-nemo"])
def test_tool_calls_round_trip_through_each_family_template(family: str) -> None:
    """The family's own Jinja writes an assistant tool call; the engine parses it back to the same call."""
    from exporter import templates

    tpl = templates.load_template(family)
    fmt = ChatFormat(tpl.jinja, {"bos_token": "<s>", "eos_token": "</s>"})
    assert fmt.tools is not None and tool_format(tpl.jinja) is fmt.tools
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    head = fmt.render(conv[:1], add_generation_prompt=True)
    full = fmt.render(conv, add_generation_prompt=False)
    answer = full[len(head) :].split(fmt.end_of_turn())[0] if fmt.end_of_turn() else full[len(head) :]
    content, calls = parse_tool_calls(fmt.tools, answer)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    import json

    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert content == ""
    assert parse_tool_calls(fmt.tools, "Just text.") == ("Just text.", [])


def test_glm_and_granite_tool_calls_parse_into_openai_calls() -> None:
    """GLM-4.6 (`<tool_call>name<arg_key>..`, written back by its own Jinja) and Granite 3.x (`<|tool_call|>[...]`,
    what the model answers; its Jinja writes no calls back) parse into OpenAI tool_calls."""
    import json

    from exporter import templates

    glm = ChatFormat(templates.load_template("glm-4.6").jinja, {"bos_token": "", "eos_token": "<|endoftext|>"})
    assert glm.tools is not None and glm.tools.name == "glm"
    args2 = {"city": "北京", "days": 3, "metric": True, "at": {"lat": 39.9, "lon": [116, "E"]}}
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"type": "function", "function": {"name": "forecast", "arguments": args2}}]  # fmt: skip
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Checking.", "tool_calls": calls}]
    head = glm.render(conv[:1], add_generation_prompt=True)
    answer = glm.render(conv, add_generation_prompt=False)[len(head) :]
    assert "<arg_key>days</arg_key>\n<arg_value>3</arg_value>" in answer
    content, parsed = parse_tool_calls(glm.tools, answer)
    assert content.endswith("Checking.")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == [
        ("get_weather", {"city": "Paris"}), ("forecast", args2)]  # fmt: skip
    granite = ChatFormat(templates.load_template("granite-3").jinja, {"bos_token": "", "eos_token": "<|end_of_text|>"})
    assert granite.tools is not None and granite.tools.name == "granite"
    out = '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'
    content, parsed = parse_tool_calls(granite.tools, out)
    assert content == "" and [c["function"]["name"] for c in parsed] == ["get_weather", "now"]
    assert parse_tool_calls(granite.tools, "<|tool_call|>[not json") == ("<|tool_call|>[not json", [])
    assert parse_tool_calls(glm.tools, "Just text.") == ("Just text.", [])


def test_glm_string_arguments_that_look_like_json_stay_strings() -> None:
    """GLM writes string values raw (`<arg_value>21</arg_value>`): where the request's schema says the parameter is
    a string it stays "21"; untyped parameters parse as JSON where they can, as before."""
    import json

    from exporter import templates

    glm = ChatFormat(templates.load_template("glm-4.6").jinja, {"bos_token": "", "eos_token": "<|endoftext|>"})
    args = {"zip": "21", "flag": "true", "note": "null", "days": 3, "ok": True}
    props = {"zip": {"type": "string"}, "flag": {"type": ["string", "null"]}, "note": {"type": "string"},
             "days": {"type": "integer"}, "ok": {"type": "boolean"}}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"properties": props}}}]
    call = {"type": "function", "function": {"name": "lookup", "arguments": args}}
    conv = [{"role": "user", "content": "Look up."}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    head = glm.render(conv[:1], tools=tools, add_generation_prompt=True)
    answer = glm.render(conv, tools=tools, add_generation_prompt=False)[len(head) :]
    assert "<arg_value>21</arg_value>" in answer  # written raw: JSON alone cannot tell it from the number 21
    _, calls = parse_tool_calls(glm.tools, answer, tools)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [args]
    _, calls = parse_tool_calls(glm.tools, answer)  # no schema: JSON where it parses
    assert json.loads(calls[0]["function"]["arguments"]) == {**args, "zip": 21, "flag": True, "note": None}
    other = [{"type": "function", "function": {"name": "other", "parameters": {"properties": props}}}]
    _, calls = parse_tool_calls(glm.tools, answer, other)  # another function's schema does not apply
    assert json.loads(calls[0]["function"]["arguments"])["zip"] == 21


def test_arg_key_tool_calls_round_trip_through_published_templates() -> None:
    """Every published template that writes GLM-style `<arg_key>` calls (GLM-4.6/4.7, Spark, Ling, Laguna): a call
    rendered by its own Jinja parses back to the same call."""
    import json

    from conftest import llama_src

    root = llama_src() / "vendor" / "llama.cpp" / "models" / "templates"
    published = {p.stem: p.read_text(encoding="utf-8") for p in sorted(root.glob("*.jinja"))}
    args = {"city": "Paris", "days": 2, "metric": True}
    call = {"id": "c1", "type": "function", "function": {"name": "forecast", "arguments": args}}
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    checked = []
    for name, jinja in published.items():
        fmt = ChatFormat(jinja, {"bos_token": "", "eos_token": "</s>"})
        if fmt.tools is None or fmt.tools.name != "glm":
            continue
        head = fmt.render(conv[:1], add_generation_prompt=True)
        _, calls = parse_tool_calls(fmt.tools, fmt.render(conv, add_generation_prompt=False)[len(head) :])
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("forecast", args)], name  # fmt: skip
        checked.append(name)
    assert "GLM-4.6" in checked and len(checked) >= 5, checked


def test_vllm_missing_is_one_clear_error(models, monkeypatch) -> None:
    import builtins

    from exporter.errors import UserError

    real = builtins.__import__

    def no_vllm(name, *a, **kw):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(UserError, match=r"pip install 'exporter\[vllm\]'"):
        load(LoadOptions(str(models.hf), backend="vllm"))


def test_bad_paths_are_user_errors(tmp_path: Path) -> None:
    from exporter.errors import UserError

    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(UserError, match="expected an HF model dir"):
        load(LoadOptions(str(tmp_path / "x.bin")))
    with pytest.raises(UserError, match="no such directory"):
        load(LoadOptions(str(tmp_path / "missing")))
    with pytest.raises(UserError, match="--backend"):
        load(LoadOptions(str(tmp_path), backend="onnx"))


def test_quantized_dir_generates_like_transformers(models, tmp_path: Path) -> None:
    """An `exporter quantize` output (bnb8, no calibration) on the hf backend == transformers loading that dir."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    require_quant()
    q8 = tmp_path / "bnb8"
    cmd = [sys.executable, "-m", "exporter", "quantize", str(models.hf), "--method", "bnb8", "--out", str(q8)]
    subprocess.run(cmd, check=True, capture_output=True)
    with load(LoadOptions(str(q8))) as eng:
        prompts = _ids(eng)[:3]
        # one at a time: LLM.int8 picks its outlier columns per batch, so a batch legitimately changes the numbers
        got = [eng.generate([p], Sampling(max_new_tokens=N))[0].token_ids for p in prompts]
        ref_model = AutoModelForCausalLM.from_pretrained(q8).eval()
        ref = [_hf_reference(ref_model, p, sorted(eng.stop_ids)) for p in prompts]
    assert all(_agree(g, r, gaps) for g, (r, gaps) in zip(got, ref, strict=True))
