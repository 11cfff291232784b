"""exporter verify: prove an export is faithful — templates, stop tokens, tokenizer, numbers and chat, compared
across the training renderer, the adapter (PEFT), the merged HF dir, every GGUF (llama.cpp) and every Modelfile.

One public entry, `verify(...) -> Report`. The checks (each a row in the report, see `exporter.verify_report`):
1. template   training renderer == exported HF Jinja == GGUF `tokenizer.chat_template` == Modelfile TEMPLATE
              (rendered by real Go `text/template`; SKIPPED with the reason when Go is absent);
2. stops      every end-of-turn token is EOG in each GGUF (declared in its metadata AND EOG for llama.cpp), a
              `PARAMETER stop` in each Modelfile, and in `generation_config.json` `eos_token_id`;
3. tokenizer  HF ids == GGUF (llama.cpp) ids on a built-in multilingual corpus, rendered chats and the data texts;
4. perplexity adapter vs merged vs each GGUF on the SAME token ids (tokenized once with HF), llama.cpp's chunked
              method (windows of `ctx` tokens, first token -> BOS, score the second half); relative difference to
              the merged model within the threshold of the file's type;
5. chat       greedy answers to N prompts through the template: full-precision GGUFs must match HF token for
              token including the stop; quantized files report where they first diverge.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import UserError
from exporter.perplexity import load_model, windows
from exporter.verify_report import Check, Report

# Max relative perplexity difference to the merged HF model, per artifact type (GGUF file type or "adapter").
DEFAULT_THRESHOLDS: dict[str, float] = {
    "adapter": 0.002,
    "f32": 0.001,
    "f16": 0.001,
    "bf16": 0.002,
    "q8_0": 0.005,
    "q6_k": 0.01,
    "q5_k_m": 0.02,
    "q5_k_s": 0.02,
    "q5_0": 0.02,
    "q5_1": 0.02,
    "q4_k_m": 0.05,
    "q4_k_s": 0.05,
    "q4_0": 0.05,
    "q4_1": 0.05,
    "q3_k_l": 0.10,
    "q3_k_m": 0.10,
    "q3_k_s": 0.15,
    "q2_k": 0.25,
    # quantized HF dirs from `exporter quantize` (kind = method + bits, read from their quantization_config)
    "gptq8": 0.01,
    "bnb8": 0.01,
    "gptq4": 0.10,
    "awq4": 0.10,
    "bnb4": 0.10,
}
FULL_PRECISION = ("f32", "f16", "bf16")
# Greedy divergence on a near-tie (HF top-2 logit gap below this) is rounding, not an export error.
TIE_MARGIN = 1e-3

# Built-in tokenizer corpus: languages, scripts, code, emoji, digits and whitespace edge cases.
TOKENIZER_CORPUS: list[str] = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "I'm sure you've heard: they'll say it's fine, we'd agree, you're right.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "機械学習は面白いです。東京タワーへ行きましょう。",
    "안녕하세요, 만나서 반갑습니다.",
    "Привет, как дела? Всё хорошо, спасибо.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Ünïcödé çåfé naïve résumé — “quotes” ‘single’ … ½ ¾ ∑ ∞ ≠ ≤",
    "Emoji: 😀😃😄 👍🏽 👩‍👩‍👧‍👦 🇫🇷 ❤️ 🙂",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    '{"key": [1, 2.5, -3e10], "nested": {"a": null, "b": true}}',
    '<div class="x">&amp; &lt;tag&gt;</div>\t// comment\r\n',
    "   leading spaces",
    "trailing spaces   ",
    "  \n\n  \t\t mixed \n whitespace \t\n",
    "\n\n\n",
    " ",
    "a  b   c    d     e",
    "3.14159 + 2.71828 = 5.85987; 1,000,000 and 007 and 12:30pm",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "URL: https://example.com/path?query=1&x=y#frag, email: someone@example.org",
    "Hmm...   wait!!! What?!? (really) [yes] {no} <maybe>",
    "ǅ ǈ ß ẞ ﬁ ﬂ Å Å ﬀ",
]

# Probe conversations for the template check (each ends with an assistant turn).
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help you today?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Now backwards."},
        {"role": "assistant", "content": "Three, two, one."},
    ],
    [
        {"role": "system", "content": "Réponds en français. 用中文也可以。"},
        {"role": "user", "content": "¿Qué tal? 你好 🙂 — “quotes”"},
        {"role": "assistant", "content": "Très bien, 谢谢！🎉"},
    ],
    [
        {"role": "user", "content": "  leading and trailing spaces  \n"},
        {"role": "assistant", "content": "line one\n\nline three\n\tindented"},
    ],
    [
        {"role": "user", "content": "Repeat this: " + "lorem ipsum dolor sit amet " * 40},
        {"role": "assistant", "content": "lorem ipsum dolor sit amet " * 40},
    ],
]

CHAT_PROMPTS: list[str] = [
    "Who are you?",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Translate 'good morning' into French.",
    "用一句话介绍你自己。",
    "List three colors.",
    "Explain recursion in one sentence.",
    "What day comes after Monday?",
]

# Built-in held-out text for perplexity when neither --text nor data is given.
HELD_OUT_TEXT = """\
The history of the lighthouse is a history of people trying to make the dark a little less dangerous. Long before
electric lamps, keepers burned wood, coal and later whale oil in open fires at the tops of towers, and sailors
learned to read each coast by the pattern of its lights. A lighthouse had to be seen from far away, so builders
chose headlands and rocky islands, places where storms arrived first and supplies arrived last.
In the nineteenth century the Fresnel lens changed everything. Instead of a single heavy mirror, the lens used rings
of glass prisms to bend the light of a small flame into a narrow, powerful beam. Keepers wound clockwork that turned
the lens so that each lighthouse flashed with its own rhythm: two short flashes every ten seconds, or one long
flash every fifteen. A captain who counted the flashes knew exactly where the ship was.
Life at a station was quiet and strict. The lamp had to be trimmed, the glass polished, the log written every night.
Families grew vegetables in thin soil, kept goats, and waited weeks for the supply boat. Children rowed to school
when the weather allowed and studied by lamplight when it did not. Many keepers were women, who took over the work
when their husbands died and often kept the light burning for decades.
Today most lighthouses are automatic. Solar panels charge batteries, sensors switch the lamp on at dusk, and
satellites have replaced the counting of flashes. Yet people still travel to these towers, climb their spiral
stairs and look out over the water. Perhaps they come for the view; perhaps for the idea that someone, somewhere,
once stayed awake all night so that strangers could find their way home.
A good recipe for bread needs only four things: flour, water, salt and yeast. Mix them, wait, fold the dough, wait
again, and bake it in a very hot oven. The waiting is the secret. Yeast turns sugars into gas and flavour, and the
gluten network stretches to hold the bubbles. Bakers talk about hydration, the ratio of water to flour: sixty
percent gives a firm loaf, eighty percent an open, glossy crumb that is harder to shape but wonderful to eat.
Mathematics offers a different kind of patience. To show that there are infinitely many prime numbers, suppose
there were only finitely many, multiply them all together and add one. The new number leaves a remainder of one
when divided by any prime on the list, so either it is prime itself or it has a prime factor missing from the list.
Either way the list was incomplete, and the assumption collapses. The argument is more than two thousand years old
and still fits on a napkin.
In a small town by the river, the market opens at seven. The fishmonger arrives first, then the woman who sells
honey in jars of every size, then the boy with crates of apples and pears. By nine the square is full of voices,
dogs, bicycles and the smell of coffee. By noon it is empty again, swept clean, as if nothing had happened at all.
"""


@dataclasses.dataclass
class Artifacts:
    """What verify looks at; any may be missing (checks that need it are not run)."""

    base: Path | None = None
    adapter: Path | None = None
    merged: Path | None = None
    ggufs: list[Path] = dataclasses.field(default_factory=list)
    modelfiles: list[Path] = dataclasses.field(default_factory=list)
    quantized: list[Path] = dataclasses.field(default_factory=list)
    data: list[Path] = dataclasses.field(default_factory=list)
    text: Path | None = None


@dataclasses.dataclass
class Modelfile:
    """The parts of an Ollama Modelfile that verify checks."""

    path: Path
    from_: str
    template: str | None
    system: str | None
    stops: list[str]


# ----------------------------------------------------------------------------------------------------- inputs


def parse_thresholds(spec: str | None) -> dict[str, float]:
    """`"f16=0.001,q8_0=0.005"` on top of the defaults (values are relative: 0.001 = 0.1%)."""
    out = dict(DEFAULT_THRESHOLDS)
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip().lower()] = float(value)
        except ValueError:
            raise UserError(f"--ppl-threshold: {item!r} is not TYPE=FRACTION (e.g. q8_0=0.005)") from None
    return out


_QUOTED = re.compile(r'^("""|")(.*?)\1\s*$', re.S)


def _unquote(value: str) -> str:
    m = _QUOTED.match(value.strip())
    return m.group(2) if m else value.strip()


def parse_modelfile(path: Path) -> Modelfile:
    """Parse FROM / TEMPLATE / SYSTEM / PARAMETER stop of an Ollama Modelfile (triple-quoted values may span lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Modelfile {path}: cannot read it ({e})") from None
    from_, template, system, stops = None, None, None, []
    i = 0
    while i < len(text):
        m = re.compile(r"[ \t]*(\w+)[ \t]+").match(text, i)
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        if not m or text[i:end].lstrip().startswith("#"):
            i = end + 1
            continue
        cmd, j = m.group(1).upper(), m.end()
        if text.startswith('"""', j):
            close = text.find('"""', j + 3)
            if close < 0:
                raise UserError(f'Modelfile {path}: unterminated """ after {cmd}')
            value, i = text[j + 3 : close], close + 3
        else:
            value, i = _unquote(text[j:end]), end + 1
        if cmd == "FROM":
            from_ = value
        elif cmd == "TEMPLATE":
            template = value
        elif cmd == "SYSTEM":
            system = value
        elif cmd == "PARAMETER":
            name, _, rest = value.partition(" ")
            if name.lower() == "stop":
                stops.append(_unquote(rest))
    if from_ is None:
        raise UserError(f"Modelfile {path}: no FROM line")
    return Modelfile(path, from_, template, system, stops)


def discover(run_dir: Path) -> Artifacts:
    """Artifacts of a pipeline run dir: adapter/, merged/, gguf/*.gguf, Modelfiles, and the recorded base/data."""
    if not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: not a directory")
    art = Artifacts()
    state = run_dir / "pipeline.json"
    if state.is_file():
        doc = json.loads(state.read_text(encoding="utf-8"))
        art.base = Path(doc["base"]) if doc.get("base") else None
        art.data = [Path(p) for p in doc.get("data") or []]
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and ".tmp-" not in p.name):
        if (d / "adapter_config.json").is_file() and art.adapter is None:
            art.adapter = d
        elif d.name != "base" and (d / "config.json").is_file() and any(d.glob("*.safetensors")) and not art.merged:
            art.merged = d
    art.ggufs = sorted(p for p in run_dir.rglob("*.gguf") if ".tmp-" not in str(p))
    art.modelfiles = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name.startswith("Modelfile"))
    return art


def _data_texts(path: Path, limit: int = 200) -> tuple[list[str], list[str]]:
    """(texts, user prompts) from a JSON/JSONL data file or dir (every string value; user turns as prompts)."""
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and p.name != "dataset_info.json")
    )
    texts: list[str] = []
    prompts: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            if x.strip():
                texts.append(x)
        elif isinstance(x, dict):
            role = x.get("role", x.get("from"))
            content = x.get("content", x.get("value"))
            if role in ("user", "human") and isinstance(content, str):
                prompts.append(content)
            if isinstance(x.get("instruction"), str):
                prompts.append((x["instruction"] + ("\n" + x["input"] if x.get("input") else "")).strip())
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
            records = (
                [json.loads(line) for line in raw.splitlines() if line.strip()]
                if f.suffix == ".jsonl"
                else [json.loads(raw)]
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"data {f}: not readable JSON ({e})") from None
        walk(records)
    return list(dict.fromkeys(texts))[:limit], list(dict.fromkeys(prompts))


# ----------------------------------------------------------------------------------------------------- GGUF


@dataclasses.dataclass
class GGUFInfo:
    """Metadata of one GGUF that the checks need (read with gguf-py)."""

    path: Path
    arch: str
    file_type: str
    chat_template: str | None
    pre: str | None
    eog_ids: dict[str, int]  # key name -> id, for eos/eot/eom
    eos_ids: list[int]  # tokenizer.ggml.eos_token_ids when present
    tokens: list[str]
    token_types: list[int]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_kv(path: Path) -> dict[str, Any]:
    """All metadata key/values of a GGUF file (numeric arrays as numpy arrays, string arrays as lists).

    A direct reader of the KV section (the GGUF spec: magic, version, counts, then key, value type, value), so a
    150k-token vocabulary reads in a fraction of a second; types per gguf-py's `GGUFValueType`.
    """
    import struct

    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
        version, _, n_kv = struct.unpack_from("<IQQ", head, 4)
    if version < 2:
        raise UserError(f"{path}: GGUF version {version} is too old")
    size = path.stat().st_size
    want = 1 << 24
    while True:  # the KV section is small; read more only when a 16 MiB head does not hold it
        with open(path, "rb") as f:
            buf = f.read(want)
        try:
            return _parse_kv(path, buf, n_kv)
        except (struct.error, IndexError, ValueError):
            if want >= size:
                raise UserError(f"{path}: truncated GGUF metadata") from None
            want *= 4


def _parse_kv(path: Path, buf: bytes, n_kv: int) -> dict[str, Any]:
    import struct

    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise IndexError
        s = buf[pos + 8 : pos + 8 + n].decode("utf-8", "replace")
        pos += 8 + n
        return s

    def value(t: int) -> Any:
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            (sub, n) = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub == 8:
                return [string() for _ in range(n)]
            if sub in _NP:
                arr = np.frombuffer(buf, dtype=_NP[sub], count=n, offset=pos)
                pos += arr.nbytes
                return arr
            return [value(sub) for _ in range(n)]
        fmt = _SCALARS.get(t)
        if fmt is None:
            raise UserError(f"{path}: unknown GGUF value type {t}")
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        out[key] = value(t)
    return out


def read_gguf(path: Path) -> GGUFInfo:
    """Read the metadata verify needs; UserError when the file is not a GGUF."""
    from gguf import LlamaFileType

    kv = read_kv(path)
    try:
        ftype = LlamaFileType(int(kv.get("general.file_type"))).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        ftype = ftype.lower()
    except (TypeError, ValueError):
        ftype = "unknown"
    eog = {
        n: int(kv[f"tokenizer.ggml.{n}_token_id"])
        for n in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{n}_token_id" in kv
    }
    eos_ids = kv.get("tokenizer.ggml.eos_token_ids")
    return GGUFInfo(
        path=path,
        arch=str(kv.get("general.architecture")),
        file_type=ftype,
        chat_template=kv.get("tokenizer.chat_template"),
        pre=kv.get("tokenizer.ggml.pre"),
        eog_ids=eog,
        eos_ids=[int(x) for x in eos_ids] if eos_ids is not None else [],
        tokens=list(kv.get("tokenizer.ggml.tokens") or []),
        token_types=[int(x) for x in kv.get("tokenizer.ggml.token_type", [])],
    )


class GGUFLoadError(Exception):
    """llama.cpp refused the file."""


def _load_llama(info: GGUFInfo, **kwargs: Any) -> Any:
    from llama_cpp import Llama

    try:
        return Llama(model_path=str(info.path), verbose=False, **kwargs)
    except Exception as e:
        raise GGUFLoadError(
            f"llama.cpp cannot load {info.path.name} ({e}; arch {info.arch!r}, tokenizer.ggml.pre={info.pre!r})"
        ) from None


# ----------------------------------------------------------------------------------------------------- checks


def _template_family(name: str | None, art: Artifacts) -> tuple[Any, str | None]:
    """(ChatTemplate or None, reason when None): --template wins, else detect on the training base, else merged."""
    try:
        from exporter import templates
    except ImportError:
        return None, "exporter.templates is not installed"
    if name:
        return templates.load_template(name), None
    for d in (art.base, art.adapter, art.merged):
        if d is not None and d.is_dir():
            try:
                return templates.resolve(d, None), None
            except UserError as e:
                return None, f"cannot tell the training template from {d}: {e} (pass --template FAMILY)"
    return None, "no model dir to detect the template from (pass --template FAMILY)"


def _render(tok: Any, jinja: str, messages: list[dict[str, str]], gen: bool) -> str:
    return tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=gen)


def _strip_bos(ids: list[int], bos: int | None) -> list[int]:
    return ids[1:] if ids and bos is not None and ids[0] == bos else ids


def _first_diff(a: Sequence[Any], b: Sequence[Any]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _text_diff(a: str, b: str, what_a: str, what_b: str) -> str:
    i = _first_diff(a, b)
    return f"{what_a} and {what_b} differ at char {i}: {a[max(0, i - 20) : i + 30]!r} vs {b[max(0, i - 20) : i + 30]!r}"


def check_template(
    tpl: Any,
    tpl_reason: str | None,
    tok: Any,
    exported: dict[str, str],
    ggufs: list[GGUFInfo],
    modelfiles: list[Modelfile],
) -> list[Check]:
    """Training renderer == exported HF Jinja == GGUF chat_template == Go-rendered Modelfile TEMPLATE."""
    checks: list[Check] = []
    if tpl is None:
        return [Check("template", "training", "fail" if exported else "skip", tpl_reason or "no template")]
    from exporter import templates

    bos = tok.bos_token_id
    n = len(PROBE_CONVERSATIONS)
    prompts = [c[:-1] for c in PROBE_CONVERSATIONS]
    ref_full = [_render(tok, tpl.jinja, c, False) for c in PROBE_CONVERSATIONS]
    ref_gen = [_render(tok, tpl.jinja, p, True) for p in prompts]

    # 1. training renderer vs the family's Jinja (token ids; a leading BOS and trailing whitespace after the final
    #    end-of-turn token are not part of what the model learns to emit)
    bad = None
    for conv, text in zip(PROBE_CONVERSATIONS, ref_full, strict=True):
        ids = list(templates.encode(tok, tpl, conv)[0])
        want = tok(text, add_special_tokens=False)["input_ids"]
        a, b = _strip_bos(ids, bos), _strip_bos(want, bos)
        if a != b and not (len(a) < len(b) and b[: len(a)] == a and not tok.decode(b[len(a) :]).strip()):
            i = _first_diff(a, b)
            bad = (
                f"training renderer and the {tpl.name} Jinja differ at token {i}: "
                f"{tok.decode(a[max(0, i - 3) : i + 5])!r} vs {tok.decode(b[max(0, i - 3) : i + 5])!r}"
            )
            break
    checks.append(
        Check(
            "template",
            f"training ({tpl.name})",
            "fail" if bad else "pass",
            bad or f"{n} conversations: ids equal",
            {"conversations": n},
        )
    )

    # 2./3. exported Jinja strings (tokenizer_config.json, chat_template.jinja, each GGUF) render like training's
    sources = dict(exported)
    for g in ggufs:
        sources[g.path.name] = g.chat_template
    for target, jinja in sources.items():
        if not jinja:
            checks.append(Check("template", target, "fail", f"{target} has no chat template"))
            continue
        problem = None
        for conv, prompt, full, gen in zip(PROBE_CONVERSATIONS, prompts, ref_full, ref_gen, strict=True):
            try:
                got_full, got_gen = _render(tok, jinja, conv, False), _render(tok, jinja, prompt, True)
            except Exception as e:  # a broken template raises from jinja2
                problem = f"its chat template does not render: {type(e).__name__}: {e}"
                break
            if got_full != full:
                problem = _text_diff(got_full, full, target, f"training template {tpl.name}")
                break
            if got_gen != gen:
                problem = _text_diff(got_gen, gen, target + " (generation prompt)", f"training template {tpl.name}")
                break
        same = jinja == tpl.jinja
        detail = problem or (f"{n} conversations render identically" + ("" if same else " (string differs)"))
        checks.append(Check("template", target, "fail" if problem else "pass", detail, {"conversations": n}))

    # 4. Modelfile TEMPLATE through real Go text/template
    for mf in modelfiles:
        target = mf.path.name
        if mf.template is None:
            checks.append(Check("template", target, "fail", f"{target} has no TEMPLATE"))
            continue
        try:
            from exporter import gotemplate
        except ImportError:
            checks.append(Check("template", target, "skip", "exporter.gotemplate is not installed"))
            continue
        problem = None
        try:  # one Go process renders every prompt; SYSTEM is prepended the way Ollama does (ollama_data)
            items = [(mf.template, gotemplate.ollama_data(p, system=mf.system)) for p in prompts]
            outs = gotemplate.render_go_many(items)
        except gotemplate.GoUnavailable as e:
            checks.append(Check("template", target, "skip", f"Go toolchain not available: {e}"))
            continue
        except UserError as e:  # the TEMPLATE does not parse or execute in Go
            outs, problem = [], f"{target} TEMPLATE fails in Go text/template: {e}"
        for got, gen in zip(outs, ref_gen, strict=False):
            want = gen.removeprefix(tok.bos_token) if tok.bos_token else gen  # Ollama's tokenizer adds BOS
            if got != want:
                problem = _text_diff(got, want, f"{target} TEMPLATE (Go)", f"training template {tpl.name}")
                break
        checks.append(
            Check(
                "template",
                target,
                "fail" if problem else "pass",
                problem or f"{n} prompts render identically with Go text/template",
                {"conversations": n},
            )
        )
    return checks


def _eot_ids(tok: Any, tpl: Any, gen_eos: list[int]) -> dict[str, int]:
    if tpl is not None:
        out = {}
        for t in tpl.eot_tokens:
            i = tok.convert_tokens_to_ids(t)
            if i is None or i == tok.unk_token_id:
                raise UserError(f"end-of-turn token {t!r} of template {tpl.name} is not in the tokenizer")
            out[t] = int(i)
        return out
    return {tok.convert_ids_to_tokens(i): i for i in gen_eos}


def _gen_eos(model_dir: Path | None) -> list[int] | None:
    if model_dir is None or not (model_dir / "generation_config.json").is_file():
        return None
    v = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    return [] if v is None else ([int(v)] if isinstance(v, int) else [int(x) for x in v])


def check_stops(
    eot: dict[str, int], merged: Path | None, ggufs: list[GGUFInfo], modelfiles: list[Modelfile]
) -> list[Check]:
    """Every end-of-turn token: in generation_config eos_token_id, EOG in each GGUF, a stop in each Modelfile."""
    from gguf import TokenType

    checks: list[Check] = []
    names = ", ".join(eot)
    if merged is not None:
        gen = _gen_eos(merged)
        missing = [t for t, i in eot.items() if i not in (gen or [])]
        checks.append(
            Check(
                "stops",
                "generation_config.json",
                "fail" if missing else "pass",
                (
                    f"generation_config.json eos_token_id {gen} lacks {', '.join(f'{t} ({eot[t]})' for t in missing)}"
                    if missing
                    else f"eos_token_id {gen} includes {names}"
                ),
                {"eos_token_id": gen, "eot_ids": eot},
            )
        )
    for g in ggufs:
        declared = set(g.eog_ids.values()) | set(g.eos_ids)
        problems = []
        for t, i in eot.items():
            if i >= len(g.tokens) or g.tokens[i] != t:
                problems.append(f"token {i} is {g.tokens[i] if i < len(g.tokens) else None!r}, not {t!r}")
                continue
            if i not in declared:
                problems.append(
                    f"{t} ({i}) is not declared end-of-generation in the metadata "
                    f"(eos/eot/eom ids: {g.eog_ids or 'none'})"
                )
            if g.token_types and g.token_types[i] != TokenType.CONTROL:
                problems.append(f"{t} ({i}) has token type {TokenType(g.token_types[i]).name}, expected CONTROL")
        if not problems:
            try:
                import llama_cpp

                llm = _load_llama(g, vocab_only=True)
                vocab = llama_cpp.llama_model_get_vocab(llm.model)
                not_eog = [t for t, i in eot.items() if not llama_cpp.llama_vocab_is_eog(vocab, i)]
                if not_eog:
                    problems.append(f"llama.cpp does not treat {', '.join(not_eog)} as end-of-generation")
                llm.close()
            except GGUFLoadError as e:
                problems.append(str(e))
        checks.append(
            Check(
                "stops",
                g.path.name,
                "fail" if problems else "pass",
                "; ".join(problems) or f"{names} end generation (metadata and llama.cpp)",
                {"eot_ids": eot, "metadata": g.eog_ids},
            )
        )
    for mf in modelfiles:
        missing = [t for t in eot if t not in mf.stops]
        checks.append(
            Check(
                "stops",
                mf.path.name,
                "fail" if missing else "pass",
                (
                    f"no PARAMETER stop for {', '.join(missing)} (stops: {mf.stops})"
                    if missing
                    else f"PARAMETER stop for {names}"
                ),
                {"stops": mf.stops},
            )
        )
    return checks


def check_tokenizer(tok: Any, ggufs: list[GGUFInfo], data_texts: list[str], chat_texts: list[str]) -> list[Check]:
    """HF ids == llama.cpp ids: plain texts with the tokenizer's own BOS/EOS, rendered chats with special tokens."""
    checks = []
    plain = TOKENIZER_CORPUS + data_texts
    for g in ggufs:
        try:
            llm = _load_llama(g, vocab_only=True)
        except GGUFLoadError as e:
            checks.append(Check("tokenizer", g.path.name, "fail", str(e), {"pre": g.pre}))
            continue
        mismatches: list[dict[str, Any]] = []
        for text, special in [(t, False) for t in plain] + [(t, True) for t in chat_texts]:
            want = tok(text, add_special_tokens=not special)["input_ids"]
            got = llm.tokenize(text.encode("utf-8"), add_bos=not special, special=special)
            if list(got) != list(want):
                i = _first_diff(got, want)
                mismatches.append({"text": text[:200], "position": i, "hf": want[i : i + 6], "gguf": got[i : i + 6]})
        llm.close()
        n = len(plain) + len(chat_texts)
        if mismatches:
            m = mismatches[0]
            detail = (
                f"{len(mismatches)}/{n} texts tokenize differently (tokenizer.ggml.pre={g.pre!r}); first: "
                f"{m['text'][:60]!r} at token {m['position']}: HF {m['hf']} vs GGUF {m['gguf']}"
            )
        else:
            detail = f"{n} texts: identical ids"
        checks.append(
            Check(
                "tokenizer",
                g.path.name,
                "fail" if mismatches else "pass",
                detail,
                {"texts": n, "mismatches": len(mismatches), "pre": g.pre, "examples": mismatches[:5]},
            )
        )
    return checks


# ----------------------------------------------------------------------------------------------------- numbers

LogitsFn = Callable[[list[int]], np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class Scored:
    """Per-window log-probabilities of the scored half (kept for the reference only) and the mean NLL."""

    nll: float
    tokens: int
    logprobs: list[np.ndarray] | None = None
    kld: float | None = None
    top1: float | None = None

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def score(fn: LogitsFn, wins: list[list[int]], ref: Scored | None, keep: bool, progress: Callable[[], None]) -> Scored:
    """Score the second half of each window (llama.cpp's `first = n_ctx/2`); KL and top-1 agreement vs `ref`."""
    nll, n, kld, agree, kept = 0.0, 0, 0.0, 0, []
    for k, w in enumerate(wins):
        first = len(w) // 2
        logits = fn(w)[first : len(w) - 1]
        if ref is not None and ref.logprobs is not None:
            v = min(logits.shape[-1], ref.logprobs[k].shape[-1])
            lp, rp = _log_softmax(logits[:, :v]), ref.logprobs[k][:, :v]
            kld += float((np.exp(rp) * (rp - lp)).sum())
            agree += int((lp.argmax(-1) == rp.argmax(-1)).sum())
        else:
            lp = _log_softmax(logits)
        target = np.asarray(w[first + 1 :])
        nll -= float(lp[np.arange(len(target)), target].sum())
        n += len(target)
        if keep:
            kept.append(lp.astype(np.float32))
        progress()
    out = Scored(nll / max(n, 1), n, kept if keep else None)
    if ref is not None and ref.logprobs is not None:
        out.kld, out.top1 = kld / max(n, 1), agree / max(n, 1)
    return out


def _hf_logits(model: Any) -> LogitsFn:
    import torch

    def fn(w: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([w], device=model.device)).logits[0].float().cpu().numpy()

    return fn


def _gguf_logits(llm: Any) -> LogitsFn:
    def fn(w: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(w)
        return np.array(llm.scores[: len(w)], dtype=np.float32)

    return fn


def _load_hf(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


class QuantizedLoadError(Exception):
    """A quantized HF dir that transformers cannot load (missing extra, corrupt files): a failed check."""


def _load_quantized(model_dir: Path) -> Any:
    try:
        return load_model(model_dir)
    except Exception as e:  # the loaders raise many types; the check reports which
        hint = " (install the [quant] extra: pip install 'exporter[quant]')" if isinstance(e, ImportError) else ""
        raise QuantizedLoadError(f"cannot load {model_dir}: {type(e).__name__}: {e}{hint}") from None


def _load_adapter(base: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_hf(base), adapter).eval()


# ----------------------------------------------------------------------------------------------------- chat


def _hf_greedy(model: Any, prompt: list[int], stop: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (ending with the stop token when reached) and the top-2 logit gap at each step."""
    import torch

    ids = torch.tensor([prompt])
    out, gaps, past = [], [], None
    with torch.no_grad():
        for _ in range(max_new):
            res = model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float()
            top = torch.topk(logits, 2).values
            t = int(logits.argmax())
            out.append(t)
            gaps.append(float(top[0] - top[1]))
            if t in stop:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out, gaps


def _gguf_greedy(llm: Any, prompt: list[int], max_new: int) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(max_new):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        if llama_cpp.llama_vocab_is_eog(vocab, t):
            break
        llm.eval([t])
    return out


# ----------------------------------------------------------------------------------------------------- entry


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as p:
        task = p.add_task(label, total=total)
        yield lambda: p.advance(task)


def _exported_templates(model_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        v = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(v, str):
            out[f"{model_dir.name}/tokenizer_config.json"] = v
    jf = model_dir / "chat_template.jinja"
    if jf.is_file():
        out[f"{model_dir.name}/chat_template.jinja"] = jf.read_text(encoding="utf-8")
    if not out:
        out[f"{model_dir.name}/tokenizer_config.json"] = ""
    return out


def quantized_kind(model_dir: Path) -> str:
    """`gptq4`, `gptq8`, `awq4`, `bnb4` or `bnb8` from a quantized HF dir's `quantization_config`."""
    from exporter.config import read_json

    q = read_json(model_dir / "config.json").get("quantization_config")
    if not isinstance(q, dict):
        raise UserError(f"--quantized {model_dir}: config.json has no quantization_config (not a quantized model)")
    method = str(q.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        return "bnb4" if q.get("load_in_4bit") or q.get("_load_in_4bit") else "bnb8"
    if method in ("gptq", "awq"):
        return f"{method}{int(q.get('bits', 4))}"
    raise UserError(f"--quantized {model_dir}: quant_method {method!r} is not one of gptq, awq, bitsandbytes")


def _check_inputs(art: Artifacts) -> None:
    for name in ("base", "adapter", "merged"):
        p = getattr(art, name)
        if p is not None and not Path(p).is_dir():
            raise UserError(f"--{name} {p}: not a directory")
    for q in art.quantized:
        if not (Path(q) / "config.json").is_file():
            raise UserError(f"--quantized {q}: no config.json (expected an `exporter quantize` output dir)")
    if art.merged is not None and not (art.merged / "config.json").is_file():
        raise UserError(f"--merged {art.merged}: no config.json (expected an exported HF model dir)")
    if art.adapter is not None and not (art.adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter {art.adapter}: no adapter_config.json (expected a PEFT adapter dir)")
    for p in art.ggufs + art.modelfiles + art.data + ([art.text] if art.text else []):
        if not Path(p).exists():
            raise UserError(f"{p}: no such file")
    if art.quantized and art.merged is None:
        raise UserError("--quantized needs --merged: quantized dirs are scored against the unquantized model")
    if art.merged is None and art.adapter is None and not art.ggufs and not art.modelfiles:
        raise UserError("nothing to verify: give --merged, --adapter, --gguf, --modelfile or --run-dir")


def verify(
    base: Path | None = None,
    adapter: Path | None = None,
    merged: Path | None = None,
    ggufs: Sequence[Path] = (),
    modelfiles: Sequence[Path] = (),
    quantized: Sequence[Path] = (),
    run_dir: Path | None = None,
    template: str | None = None,
    thresholds: dict[str, float] | None = None,
    prompts: int = 4,
    text: Path | None = None,
    data: Path | Sequence[Path] | None = None,
    ctx: int = 128,
    max_windows: int = 8,
    max_new_tokens: int = 24,
) -> Report:
    """Run every check that the given artifacts allow; a pipeline `run_dir` fills in whatever is not given."""
    t0 = time.perf_counter()
    art = discover(Path(run_dir)) if run_dir is not None else Artifacts()
    art.base = Path(base) if base else art.base
    art.adapter = Path(adapter) if adapter else art.adapter
    art.merged = Path(merged) if merged else art.merged
    art.ggufs = [Path(p) for p in ggufs] or art.ggufs
    art.modelfiles = [Path(p) for p in modelfiles] or art.modelfiles
    art.quantized = [Path(p) for p in quantized] or art.quantized
    art.text = Path(text) if text else None
    if data:
        art.data = [Path(data)] if isinstance(data, (str, Path)) else [Path(p) for p in data]
    if art.adapter is not None and art.base is None:
        cfg = json.loads((art.adapter / "adapter_config.json").read_text(encoding="utf-8"))
        if cfg.get("base_model_name_or_path"):
            from exporter import hub

            art.base = hub.resolve(cfg["base_model_name_or_path"], "base model of the adapter")
    _check_inputs(art)
    thresholds = dict(thresholds or DEFAULT_THRESHOLDS)
    quantized_kinds = [quantized_kind(q) for q in art.quantized]  # bad dirs fail before any model is loaded
    infos = [read_gguf(p) for p in art.ggufs]
    mfs = [parse_modelfile(p) for p in art.modelfiles]
    data_texts, data_prompts = [], []
    for p in art.data:
        t, q = _data_texts(p)
        data_texts, data_prompts = data_texts + t, data_prompts + q
    data_texts, data_prompts = list(dict.fromkeys(data_texts))[:200], list(dict.fromkeys(data_prompts))

    from transformers import AutoTokenizer

    tok_dir = art.merged or art.adapter or art.base
    tok = AutoTokenizer.from_pretrained(tok_dir) if tok_dir else None
    if tok is None:
        raise UserError("verify needs an HF tokenizer: give --merged (or --adapter/--base) with the GGUF files")

    tpl, reason = _template_family(template, art)
    checks: list[Check] = []
    exported = _exported_templates(art.merged) if art.merged else {}
    checks += check_template(tpl, reason, tok, exported, infos, mfs)

    gen_eos = _gen_eos(art.merged) or []
    eot = _eot_ids(tok, tpl, gen_eos)
    checks += check_stops(eot, art.merged, infos, mfs)

    chat_source = tpl.jinja if tpl is not None else tok.chat_template
    chat_texts = [_render(tok, chat_source, c, False) for c in PROBE_CONVERSATIONS] if chat_source else []
    checks += check_tokenizer(tok, infos, data_texts, chat_texts)

    hf_model = _load_hf(art.merged) if art.merged else None
    checks += _check_numbers(art, tok, hf_model, infos, quantized_kinds, thresholds, ctx, max_windows)
    prompt_list = (data_prompts + CHAT_PROMPTS)[:prompts]
    checks += _check_chat(tok, hf_model, chat_source, infos, prompt_list, gen_eos or list(eot.values()), max_new_tokens)

    from exporter import manifest

    artifacts = {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
        for k, v in dataclasses.asdict(art).items()
    }
    artifacts["template"] = tpl.name if tpl is not None else None
    return Report(checks, artifacts, thresholds, time.perf_counter() - t0, manifest.versions())


def _check_numbers(
    art: Artifacts,
    tok: Any,
    hf_model: Any,
    infos: list[GGUFInfo],
    quantized_kinds: list[str],
    thresholds: dict[str, float],
    ctx: int,
    max_windows: int,
) -> list[Check]:
    if hf_model is None and art.adapter is None:
        return [Check("perplexity", "-", "skip", "no HF model (--merged or --adapter) to compare with")]
    text = art.text.read_text(encoding="utf-8") if art.text else HELD_OUT_TEXT
    ids = tok(text, add_special_tokens=False)["input_ids"]  # tokenized ONCE: every model sees these ids
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else None
    wins = windows(ids, ctx, bos, max_windows)
    if not wins:
        raise UserError(f"held-out text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    checks: list[Check] = []
    n_models = (hf_model is not None) + (art.adapter is not None) + len(infos) + len(art.quantized)
    with _progress(n_models * len(wins), "perplexity") as step:
        ref_name = "merged" if hf_model is not None else "adapter"
        ref_model = hf_model if hf_model is not None else _load_adapter(art.base, art.adapter)
        ref = score(_hf_logits(ref_model), wins, None, True, step)
        base_metrics = {"ref": ref_name, "ref_ppl": ref.ppl, "tokens": ref.tokens, "windows": len(wins), "ctx": ctx}
        checks.append(
            Check(
                "perplexity",
                ref_name,
                "pass",
                f"reference ppl {ref.ppl:.4f} on {ref.tokens} tokens",
                {"ppl": ref.ppl, **base_metrics},
            )
        )
        # (target, kind, loader, is an HF model): every one is scored on the same windows as the reference
        others: list[tuple[str, str, Callable[[], Any], bool]] = []
        if hf_model is not None and art.adapter is not None:
            others.append(("adapter", "adapter", lambda: _load_adapter(art.base, art.adapter), True))
        for g in infos:
            others.append(
                (
                    g.path.name,
                    g.file_type,
                    lambda g=g: _load_llama(g, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True),
                    False,
                )
            )
        for q, kind in zip(art.quantized, quantized_kinds, strict=True):
            others.append((q.name, kind, lambda q=q: _load_quantized(q), True))
        for target, kind, load, is_hf in others:
            try:
                m = load()
            except (GGUFLoadError, QuantizedLoadError) as e:
                checks.append(Check("perplexity", target, "fail", str(e)))
                for _ in wins:
                    step()
                continue
            fn = _hf_logits(m) if is_hf else _gguf_logits(m)
            s = score(fn, wins, ref, False, step)
            if hasattr(m, "close"):
                m.close()
            del m
            rel = abs(s.ppl - ref.ppl) / ref.ppl
            thr = thresholds.get(kind)
            metrics = {
                "ppl": s.ppl,
                "rel_diff": rel,
                "threshold": thr,
                "type": kind,
                "kld": s.kld,
                "top1": s.top1,
                **base_metrics,
            }
            if thr is None:
                checks.append(
                    Check(
                        "perplexity",
                        target,
                        "fail",
                        f"no threshold for type {kind!r}; pass --ppl-threshold {kind}=FRACTION",
                        metrics,
                    )
                )
                continue
            ok = rel <= thr
            detail = (
                f"ppl {s.ppl:.4f} vs {ref_name} {ref.ppl:.4f}: {rel * 100:.3f}% "
                f"{'<=' if ok else '>'} {thr * 100:g}% ({kind}); KL {s.kld:.2e}, top-1 {s.top1 * 100:.1f}%"
            )
            checks.append(Check("perplexity", target, "pass" if ok else "fail", detail, metrics))
    return checks


def _check_chat(
    tok: Any,
    hf_model: Any,
    jinja: str | None,
    infos: list[GGUFInfo],
    prompts: list[str],
    stop: list[int],
    max_new: int,
) -> list[Check]:
    if not infos or not prompts:
        return []
    if hf_model is None:
        return [Check("chat", "-", "skip", "needs --merged (the HF model to compare the GGUF answers with)")]
    if not jinja:
        return [Check("chat", "-", "fail", "no chat template to render the prompts with")]
    prompt_ids = [
        tok(_render(tok, jinja, [{"role": "user", "content": p}], True), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    checks: list[Check] = []
    with _progress(len(prompts) * (1 + len(infos)), "chat") as step:
        ref = []
        for ids in prompt_ids:
            ref.append(_hf_greedy(hf_model, ids, stop, max_new))
            step()
        hf_answers = [tok.decode(r[0], skip_special_tokens=True) for r in ref]
        for g in infos:
            try:
                llm = _load_llama(g, n_ctx=max(len(p) for p in prompt_ids) + max_new + 8, logits_all=True)
            except GGUFLoadError as e:
                checks.append(Check("chat", g.path.name, "fail", str(e)))
                continue
            outs, firsts, notes = [], [], []
            for ids, (want, gaps) in zip(prompt_ids, ref, strict=True):
                got = _gguf_greedy(llm, ids, max_new)
                outs.append(got)
                step()
                if got == want:
                    firsts.append(None)
                    continue
                i = _first_diff(got, want)
                firsts.append(i)
                if i < len(want) and i < len(got) and gaps[i] < TIE_MARGIN:
                    notes.append(i)  # HF itself had a near-tie there: either token is a faithful greedy pick
            llm.close()
            answers = [
                {"prompt": p, "hf": h, "gguf": tok.decode(o, skip_special_tokens=True), "first_divergence": f}
                for p, h, o, f in zip(prompts, hf_answers, outs, firsts, strict=True)
            ]
            metrics = {
                "prompts": len(prompts),
                "exact": firsts.count(None),
                "first_divergence": firsts,
                "hf_tokens": [r[0] for r in ref],
                "gguf_tokens": outs,
                "answers": answers,
                "near_ties": len(notes),
            }
            real = [f for f in firsts if f is not None and f not in notes]
            if g.file_type in FULL_PRECISION:
                if real:
                    k = next(j for j, f in enumerate(firsts) if f is not None and f not in notes)
                    w, o = ref[k][0], outs[k]
                    f = firsts[k]
                    detail = (
                        f"prompt {prompts[k]!r}: GGUF diverges from HF at token {f}: "
                        f"HF {tok.decode(w[f : f + 4])!r}{' (stop)' if f == len(w) - 1 and w[-1] in stop else ''}"
                        f" vs GGUF {tok.decode(o[f : f + 4])!r}" + (" (GGUF did not stop)" if len(o) > len(w) else "")
                    )
                    checks.append(Check("chat", g.path.name, "fail", detail, metrics))
                else:
                    extra = f" ({len(notes)} near-tie)" if notes else ""
                    checks.append(
                        Check(
                            "chat",
                            g.path.name,
                            "pass",
                            f"{firsts.count(None)}/{len(prompts)} answers token-exact incl. stop{extra}",
                            metrics,
                        )
                    )
            else:
                div = ", ".join("=" if f is None else str(f) for f in firsts)
                checks.append(
                    Check(
                        "chat",
                        g.path.name,
                        "pass",
                        f"{firsts.count(None)}/{len(prompts)} token-exact; first divergence per prompt: {div}",
                        metrics,
                    )
                )
    return checks
