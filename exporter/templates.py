"""Chat-template families as data: one YAML file per family drives training, HF Jinja, GGUF and Ollama.

Each `templates/<family>.yaml` (installed as package `exporter.families`) defines the HF Jinja `chat_template`, the
Ollama Go `TEMPLATE`, `PARAMETER stop` strings, the end-of-turn tokens, the default system prompt, the BOS/EOS text
the Jinja renders, and a `format` block that drives the training renderer (`exporter/render.py`).

BOS: HF Jinja templates of llama-2/llama-3.1/mistral-nemo/gemma-3 render `bos_token` as text; Ollama and llama.cpp
add BOS at tokenization instead, so the Go TEMPLATE never renders the leading BOS. The training renderer follows the
Jinja (BOS as text, tokenized with `add_special_tokens=False`), so the ids carry exactly one BOS.

The model's own template is the truth: `resolve(model_dir, None)` keeps the model's Jinja (exported byte for byte)
and names the family whose Jinja renders every probe exactly like it; when none does, `exporter.derive` derives the
Go TEMPLATE, stops, end-of-turn tokens and default system from the Jinja itself and training follows the Jinja
(`exporter.jinja_segments`). A template problem never raises there; it becomes `notes`. A family whose `format` is
`{kind: jinja}` carries a published Jinja as it is with a hand-written Go TEMPLATE (tools included) and `notes` on what
Go prints otherwise: detection never names it; derive picks its TEMPLATE by rendering.

Protocol: anything train, verify and calibration encode with is a `ChatTemplate`: `jinja` (what is exported),
`ollama` (Modelfile TEMPLATE, "" for none), `stop`, `eot_tokens`, `default_system`, and either a `format` the
segment renderer knows (a family's layout; `{"kind": "jinja", ...}` the model's own Jinja; `{"kind": "none"}` no
template) or an `encoder(tokenizer, messages, tools=, train_on_prompt=, cutoff_len=) -> (ids, labels)` of its own;
a template that changes the tokenizer (LLaMA-Factory's eos replacement and stop words) has a `tokenizer_fix`, applied
by train before encoding and by `write_into` to every exported tokenizer.

Names: a LLaMA-Factory template name (`exporter.lf_names`, LF's own formats and encoding) resolves first, then a
family name; official families are named after the release they reproduce (`llama-3.1`, `qwen-2.5`), never an LF
name.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from exporter.config import read_json, read_json_object, read_text
from exporter.diff import first_diff
from exporter.errors import UserError
from exporter.hf_dir import saved_chat_template

FAMILIES_PACKAGE = "exporter.families"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One chat-template family. `jinja` is the HF chat_template, `ollama` the Modelfile TEMPLATE."""

    name: str
    description: str
    jinja: str
    ollama: str
    stop: list[str]
    eot_tokens: list[str]
    default_system: str | None
    bos_token: str | None
    eos_token: str | None
    tools: bool
    format: dict[str, Any]
    notes: tuple[str, ...] = ()  # what differs between the Jinja and the Go TEMPLATE, and why (derived templates)
    encoder: Callable[..., tuple[list[int], list[int]]] | None = None  # own token-level encoding (see module doc)
    tokenizer_fix: Callable[[Any], None] | None = None  # changes a tokenizer needs before encoding and export

    @property
    def kind(self) -> str:
        """family (a layout of ours), jinja (the model's own Jinja trains) or none (no template at all)."""
        return str(self.format.get("kind", "family"))

    def for_tokenizer(self, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
        """This family with the tokenizer's BOS/EOS text filled in: base-model formats (stanford-alpaca, vicuna-1.1,
        human-assistant) end answers with whatever eos the tokenizer has, written `{eos_token}` in `eot_tokens` and
        `ollama`."""
        eos = self.eos_token if self.eos_token is not None else eos_token
        bos = self.bos_token if self.bos_token is not None else bos_token
        if "{eos_token}" in self.ollama + "".join(self.eot_tokens) and not eos:
            raise UserError(
                f"template family {self.name!r} ends answers with the tokenizer's eos token, but it has none"
            )

        def fill(s: str) -> str:
            return s.replace("{eos_token}", eos or "")

        return dataclasses.replace(
            self,
            bos_token=bos,
            eos_token=eos,
            ollama=fill(self.ollama),
            eot_tokens=[fill(t) for t in self.eot_tokens],
            stop=[fill(t) for t in self.stop],
        )


_REQUIRED = ("name", "description", "jinja", "ollama", "stop", "eot_tokens", "format")
_OPTIONAL = {"default_system": None, "bos_token": None, "eos_token": None, "tools": False, "notes": ()}


def _family_files() -> dict[str, Any]:
    root = importlib.resources.files(FAMILIES_PACKAGE)
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_templates() -> list[str]:
    """Names of all known families, sorted."""
    return sorted(_family_files())


def _parse(name: str, text: str, where: str) -> ChatTemplate:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping at the top level")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"{where}: missing keys {', '.join(missing)}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)}")
    if data["name"] != name:
        raise UserError(f"{where}: name {data['name']!r} does not match the file name {name!r}")
    values = {**_OPTIONAL, **data}
    values["stop"] = [str(s) for s in values["stop"]]
    values["eot_tokens"] = [str(s) for s in values["eot_tokens"]]
    values["notes"] = tuple(str(n) for n in values["notes"] or ())
    return ChatTemplate(**values)


def load_template(name: str) -> ChatTemplate:
    """The family `name`; a UserError with a did-you-mean (families and LLaMA-Factory names) when there is none."""
    from exporter import lf_templates
    from exporter.config import did_you_mean

    files = _family_files()
    if name not in files:
        lf_names = lf_templates.names()
        raise UserError(
            f"unknown chat template {name!r}{did_you_mean(name, [*files, *lf_names])}; families: "
            f"{', '.join(sorted(files))}; LLaMA-Factory names: {', '.join(lf_names)}"
        )
    return _parse(name, files[name].read_text(encoding="utf-8"), f"template family {name}")


def _token_ids(out_dir: Path, tokens: list[str]) -> list[int | None]:
    """Ids of `tokens` in the tokenizer saved in `out_dir` (None where the vocabulary lacks one)."""
    tj = out_dir / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(tj))
        return [tk.token_to_id(t) for t in tokens]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    ids = tok.convert_tokens_to_ids(tokens)
    return [None if i is None or i == tok.unk_token_id else int(i) for i in ids]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from exporter.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fix_saved_tokenizer(out_dir: Path, fix: Callable[[Any], None]) -> dict[str, Any] | None:
    """Apply `fix` to the tokenizer saved in `out_dir`; save it back (and return its new config) when it changed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    before = (tok.eos_token, tok.pad_token, len(tok), tuple(tok.all_special_tokens))
    fix(tok)
    if before == (tok.eos_token, tok.pad_token, len(tok), tuple(tok.all_special_tokens)):
        return None
    tok.save_pretrained(str(out_dir))
    stale = out_dir / "special_tokens_map.json"  # not rewritten by transformers 5, and it wins on load
    if stale.is_file():
        data = read_json(stale)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, key)
            if key in data or value is not None:
                data[key] = {**data[key], "content": value} if isinstance(data.get(key), dict) else value
        _write_json(stale, data)
    return read_json(out_dir / "tokenizer_config.json")


def write_into(out_dir: Path | str, tpl: ChatTemplate, strict: bool = True) -> list[str]:
    """Make an exported HF dir use `tpl`: `tokenizer_config.json` + `chat_template.jinja` carry its Jinja (left
    untouched when they already hold it), and `generation_config.json` `eos_token_id` includes every end-of-turn
    token id (ids from the tokenizer in out_dir). An end-of-turn token the tokenizer lacks is a UserError when
    `strict`, else left out and returned as a warning (a template nobody asked for never stops an export)."""
    from exporter.atomic import atomic_file

    out_dir = Path(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{out_dir}: no tokenizer_config.json; save the tokenizer there before writing the template")
    cfg = read_json(cfg_path)
    if tpl.tokenizer_fix is not None:
        cfg = _fix_saved_tokenizer(out_dir, tpl.tokenizer_fix) or cfg
    tpl = tpl.for_tokenizer(_token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))
    try:
        current = model_chat_template(out_dir)[0]
    except UserError:
        current = None
    ids, warnings = [], []
    for token, tid in zip(tpl.eot_tokens, _token_ids(out_dir, tpl.eot_tokens), strict=True):
        if tid is None:
            msg = f"template {tpl.name!r} ends assistant turns with {token!r}, but the tokenizer in {out_dir} has no "
            if strict:
                raise UserError(msg + "such token; pick the family that matches this tokenizer with --template")
            warnings.append(msg + "such token; it is not added to generation_config.json eos_token_id")
            continue
        ids.append(tid)

    if tpl.jinja and tpl.jinja != current:  # the model's own template stays byte for byte as it was saved
        cfg["chat_template"] = tpl.jinja
        _write_json(cfg_path, cfg)
        with atomic_file(out_dir / "chat_template.jinja") as tmp:
            tmp.write_text(tpl.jinja, encoding="utf-8")

    gen_path = out_dir / "generation_config.json"
    gen = read_json(gen_path, optional=True)
    eos = gen.get("eos_token_id")
    current = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    merged = current + [i for i in ids if i not in current]
    if merged:
        gen["eos_token_id"] = merged[0] if len(merged) == 1 else merged
        _write_json(gen_path, gen)
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# Detection by content: render probe conversations through the model's own chat_template and through each family.
# ---------------------------------------------------------------------------------------------------------------

PROBES: list[tuple[list[dict[str, Any]], bool]] = [
    ([{"role": "user", "content": "Hello there"}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}], True),
    (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        True,
    ),
    ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], False),
    # what verify compares too: whitespace kept or trimmed, unicode, empty content, multi-line answers
    ([{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": " spaced answer "}], False),
    (
        [
            {"role": "system", "content": "Réponds en français. 用中文也可以。"},
            {"role": "user", "content": "¿Qué tal? 你好 🙂 — “quotes”"},
            {"role": "assistant", "content": "Très bien, 谢谢！🎉\n\nline\n\tindented"},
        ],
        False,
    ),
    (
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "Say it."}],
        True,
    ),
]


_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
_CALL = {"id": "call0A1b2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_PROBE = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [_CALL]},
    {"role": "tool", "tool_call_id": "call0A1b2", "name": "get_weather", "content": "21 C, sunny"},
    {"role": "assistant", "content": "It is 21 C and sunny."},
]  # fmt: skip


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return "" if value is None else str(value)


def model_chat_template(model_dir: Path | str) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) as saved in an HF dir (chat_template.jinja wins, as in transformers)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        cfg = read_json_object(cfg_path)
    elif not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a directory")
    template = None
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        template = read_text(jinja_file)
    else:
        template = saved_chat_template(cfg, cfg_path)
    if not template:
        raise UserError(
            f"{model_dir} has no chat_template (tokenizer_config.json or chat_template.jinja); "
            f"pass --template with one of: {', '.join(list_templates())}"
        )
    return template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))


def model_tokens(model_dir: Path | str) -> tuple[list[str], list[str]]:
    """(added tokens of the tokenizer, the tokens of generation_config.json `eos_token_id`) of an HF dir."""
    model_dir = Path(model_dir)
    markers: list[str] = []
    vocab: dict[int, str] = {}
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        data = read_json(tj)
        for t in data.get("added_tokens") or []:
            if isinstance(t, dict) and isinstance(t.get("content"), str):
                markers.append(t["content"])
                vocab[int(t.get("id", -1))] = t["content"]
        model_vocab = (data.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):
            vocab.update({v: k for k, v in model_vocab.items() if isinstance(v, int)})
    decoder = read_json_object(model_dir / "tokenizer_config.json", optional=True).get("added_tokens_decoder")
    for tid, t in (decoder or {}).items():
        if isinstance(t, dict) and isinstance(t.get("content"), str):
            markers.append(t["content"])
            vocab.setdefault(int(tid), t["content"])
    ids = read_json_object(model_dir / "generation_config.json", optional=True).get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else [i for i in ids or [] if isinstance(i, int)]
    return list(dict.fromkeys(markers)), [vocab[i] for i in ids if i in vocab]


def _render_jinja(
    template: str, messages: list[dict[str, Any]], gen: bool, bos: str, eos: str, tools: list | None = None
) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=gen,
                                   bos_token=bos, eos_token=eos, tools=tools)  # fmt: skip
    return out[0]


def tool_probe(template: str, bos: str, eos: str) -> str | None:
    """The template's rendering of a tool call and its result, or None when it has no tool format."""
    if "tools" not in template:
        return None
    try:
        return _render_jinja(template, TOOL_PROBE, False, bos, eos, [_TOOL])
    except Exception:  # no tool format after all
        return None


def match_family(template: str, bos: str = "", eos: str = "") -> tuple[ChatTemplate | None, str]:
    """(the family whose Jinja renders every probe exactly as `template` does, or None; a line naming the nearest
    family and where it first differs)."""
    import difflib

    refs: list[tuple[int, str]] = []
    for k, (msgs, gen) in enumerate(PROBES):
        try:
            refs.append((k, _render_jinja(template, msgs, gen, bos, eos)))
        except Exception:  # the model's template may refuse a probe (e.g. no system role): compare the others
            continue
    if not refs:
        return None, "its chat_template fails on every probe conversation"
    tool_ref = tool_probe(template, bos, eos)
    best: tuple[float, str, int, str, str] | None = None
    for name in list_templates():
        tpl = load_template(name)
        if tpl.kind == "jinja":  # a published Jinja with a hand-written Go TEMPLATE: derive picks it by rendering
            continue
        diff = None
        score = 0.0
        for k, ref in refs:
            msgs, gen = PROBES[k]
            try:
                ours = _render_jinja(tpl.jinja, msgs, gen, bos, eos)
            except Exception:
                ours = ""
            if ours != ref and diff is None:
                diff = (k, ref, ours)
            score += difflib.SequenceMatcher(None, ref, ours, autojunk=False).ratio()
        if tool_ref is not None and diff is None:  # the model's tool format must be the family's too
            ours = tool_probe(tpl.jinja, bos, eos) if tpl.tools else None
            if ours != tool_ref:
                diff = (len(PROBES), tool_ref, ours or "")
        if diff is None:
            return tpl, ""
        if best is None or score > best[0]:
            best = (score, name, *diff)
    assert best is not None
    _, name, k, ref, ours = best
    at = first_diff(ref, ours)
    return None, (
        f"nearest family is {name!r}, which first differs at char {at} of "
        f"{'the tool probe' if k == len(PROBES) else f'probe {k}'}: the model renders "
        f"{ref[at : at + 40]!r}, {name} renders {ours[at : at + 40]!r}"
    )


def detect_template_text(
    template: str,
    bos: str = "",
    eos: str = "",
    markers: list[str] | None = None,
    eos_tokens: list[str] | None = None,
) -> ChatTemplate:
    """The family whose Jinja renders every probe exactly as `template` does, carrying `template` itself as its
    Jinja; else a template derived from `template` (`exporter.derive.chat_template`). Never raises for a template."""
    from exporter.derive import with_eos_stops

    family, nearest = match_family(template, bos, eos)
    if family is not None:
        note = (f"chat template: the model's own Jinja, which renders every probe exactly like family {family.name!r}; "
                f"Ollama TEMPLATE of family {family.name}")  # fmt: skip
        filled = family.for_tokenizer(bos or None, eos or None)
        # the family's stops plus eos and generation_config's eos tokens, as a derived template's (stops_for)
        return dataclasses.replace(filled, jinja=template, notes=(note, *family.notes),
                                   stop=with_eos_stops(filled.stop, eos, eos_tokens or []))  # fmt: skip
    from exporter.derive import chat_template

    return chat_template(template, bos, eos, markers, eos_tokens or [], nearest)


def detect(model_dir: Path | str) -> ChatTemplate:
    """The template of the chat_template saved in `model_dir`: a family when one matches by rendered content (never
    by name), else derived from it. UserError only when there is no chat_template at all."""
    template, bos, eos = model_chat_template(model_dir)
    markers, eos_tokens = model_tokens(model_dir)
    return detect_template_text(template, bos, eos, markers + [t for t in (bos, eos) if t], eos_tokens)


def no_template(bos: str, eos: str) -> ChatTemplate:
    """What a model without any chat template exports with: no Jinja, no Ollama TEMPLATE, eos as the stop."""
    note = "the model has no chat template: none is exported, and the Modelfile has no TEMPLATE"
    return ChatTemplate(name="none", description="no chat template", jinja="", ollama="", stop=[eos] if eos else [],
                        eot_tokens=[], default_system=None, bos_token=bos or None, eos_token=eos or None,
                        tools=False, format={"kind": "none"}, notes=(note,))  # fmt: skip


def _relabel(tpl: ChatTemplate, model_dir: Path | str, label: str) -> ChatTemplate:
    """`tpl` whose notes and description say `label` instead of "the model's own Jinja" when its Jinja is not the
    model's (a --template that replaced it, or a model without one)."""
    try:
        own: str | None = model_chat_template(model_dir)[0]
    except UserError:
        own = None
    if tpl.jinja == own:
        return tpl

    def say(text: str) -> str:
        return text.replace("the model's own Jinja", label).replace("the model renders", "it renders")

    return dataclasses.replace(tpl, description=say(tpl.description), notes=tuple(say(n) for n in tpl.notes))


def resolve(model_dir: Path | str, override: str | None, need: bool = True) -> ChatTemplate:
    """`override` (a family name; "auto" = none) when given, else `detect(model_dir)`; filled in with the model's
    BOS/EOS text (see `ChatTemplate.for_tokenizer`). Without any chat template in the model: a UserError when
    `need` (training), else `no_template` (merge, quantize and gguf go on)."""
    cfg = read_json(Path(model_dir) / "tokenizer_config.json", optional=True)
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    if override and override != "auto":
        from exporter import lf_names

        if lf_names.is_lf_name(override):
            return _relabel(lf_names.resolve(model_dir, override), model_dir, f"LLaMA-Factory's Jinja for {override!r}")
        return load_template(override).for_tokenizer(bos or None, eos or None)
    try:
        return detect(model_dir)
    except UserError:
        if need:
            raise
        return no_template(bos, eos)


# ---------------------------------------------------------------------------------------------------------------
# CLI helpers (`exporter template ...`): each returns the text to print.
# ---------------------------------------------------------------------------------------------------------------


def read_conversation(path: Path | str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) from a JSON file: a list of messages or {"messages": [...], "tools": [...]}."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a conversation JSON file")
    if not path.is_file():
        raise UserError(f"conversation file {path} not found")
    data = read_json(path)
    tools = None
    if isinstance(data, dict):
        tools = data.get("tools")
        data = data.get("messages")
    if not isinstance(data, list) or not data:
        raise UserError(f'{path}: expected a non-empty list of messages or {{"messages": [...], "tools": [...]}}')
    if tools is not None and not isinstance(tools, list):
        raise UserError(f"{path}: 'tools' must be a list")
    return data, tools


_OLLAMA_BOS = "Ollama's TEMPLATE has no BOS: Ollama adds the model's own when it tokenizes"


def check_token_flags(tpl: ChatTemplate, bos_token: str | None, eos_token: str | None) -> None:
    """--bos-token / --eos-token give the tokenizer's texts to the families that write them from the tokenizer (the
    family has none of its own and its Jinja uses it); on any other family they would change nothing: refused."""
    for flag, given, own in (("--bos-token", bos_token, tpl.bos_token), ("--eos-token", eos_token, tpl.eos_token)):
        word = flag[2:5]
        if given is None or (own is None and f"{word}_token" in tpl.jinja):
            continue
        takers = [n for n in list_templates() if getattr(load_template(n), f"{word}_token") is None
                  and f"{word}_token" in load_template(n).jinja]  # fmt: skip
        what = f"writes its own {word} {own!r}" if own is not None else f"writes no {word} token"
        raise UserError(f"{flag} with {tpl.name}: the family {what}; {flag} is for the families that take it from "
                        f"the tokenizer ({', '.join(takers)}); drop it")  # fmt: skip


def render_for_cli(
    family: str,
    conversation: Path | str,
    fmt: str = "train",
    add_generation_prompt: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> list[tuple[str, bool]]:
    """Render a conversation file with one family: `train` (segments with the trained flag), `jinja` (transformers
    apply_chat_template of our Jinja) or `ollama` (real Go text/template; no leading BOS, which Ollama adds at
    tokenization). The generation prompt defaults to on when the conversation does not end with an answer; asking
    otherwise is refused where nothing can honour it (an LF name's text, Ollama's Go template).
    A LLaMA-Factory name renders LF's training text and LF's generated Jinja (`lf_names.render_for_cli`)."""
    from exporter import lf_names
    from exporter.render import check_roles, render_segments

    messages, tools = read_conversation(conversation)
    check_roles(messages)
    if fmt == "ollama":
        for i, m in enumerate(messages):
            if m.get("content") is not None and not isinstance(m.get("content"), str):
                raise UserError(
                    f"{conversation}: message {i} content is a {type(m['content']).__name__}; Ollama's messages hold "
                    "text: give it as a string"
                )
    opens = messages[-1].get("role") != "assistant"  # the generation prompt by default
    lf_name = lf_names.is_lf_name(family)
    if add_generation_prompt is not None and add_generation_prompt != opens and (lf_name or fmt == "ollama"):
        flag = "--generation-prompt" if add_generation_prompt else "--no-generation-prompt"
        why = (f"LLaMA-Factory's {family} writes the assistant's header as part of the turn before it (its training "
               "text and its generated Jinja alike)" if lf_name else "Ollama's template has no such switch: it "
               "opens the assistant's turn after any other message and continues a last assistant message")  # fmt: skip
        raise UserError(f"{flag} with {family} --format {fmt}: {why}; drop it")
    if lf_name:
        return lf_names.render_for_cli(family, messages, tools, fmt, bos_token, eos_token)
    tpl = load_template(family)
    check_token_flags(tpl, None if fmt == "ollama" else bos_token, eos_token)
    if fmt == "ollama" and bos_token is not None:
        raise UserError(f"--bos-token with --format ollama: {_OLLAMA_BOS}; drop it")
    tpl = tpl.for_tokenizer(bos_token, eos_token)
    gen = opens if add_generation_prompt is None else add_generation_prompt
    if fmt == "train":
        return render_segments(tpl, messages, tools=tools, add_generation_prompt=gen)
    if fmt == "jinja":
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            out, _ = render_jinja_template(
                conversations=[messages],
                tools=tools,
                chat_template=tpl.jinja,
                add_generation_prompt=gen,
                bos_token=tpl.bos_token or "",
                eos_token=tpl.eos_token or "",
            )
        except Exception as e:
            raise UserError(f"{conversation}: the {family} Jinja template refused it: {e}") from None
        return [(out[0], False)]
    if fmt == "ollama":
        from exporter.gotemplate import ollama_data, render_go

        return [(render_go(tpl.ollama, ollama_data(messages, tools)), False)]
    raise UserError(f"unknown format {fmt!r}; use train, jinja or ollama")


def show_for_cli(family: str, fmt: str = "jinja", bos_token: str | None = None, eos_token: str | None = None) -> str:
    """The family's HF Jinja or Ollama TEMPLATE (with its PARAMETER stop lines and SYSTEM as Modelfile text); for a
    LLaMA-Factory name also its slots (`lf_names.show_for_cli`)."""
    from exporter import lf_names

    if lf_names.is_lf_name(family):
        return lf_names.show_for_cli(family, fmt, bos_token, eos_token)
    tpl = load_template(family)
    if fmt == "jinja":
        if bos_token is not None or eos_token is not None:
            raise UserError(f"--bos-token / --eos-token with {family} --format jinja: the family's Jinja is printed as "
                            "it is, and reads bos_token and eos_token from the tokenizer when it renders (`template "
                            "render --format jinja` takes them); drop them")  # fmt: skip
        return tpl.jinja
    if fmt == "ollama":
        if bos_token is not None:
            raise UserError(f"--bos-token with --format ollama: {_OLLAMA_BOS}; drop it")
        check_token_flags(tpl, None, eos_token)
        lines = []
        if "{eos_token}" in tpl.ollama + "".join(tpl.stop):
            if eos_token:
                tpl = tpl.for_tokenizer(bos_token, eos_token)
            if "{eos_token}" in tpl.ollama + "".join(tpl.stop):
                lines.append(
                    "# {eos_token} stands for the tokenizer's eos text (an export fills in the model's); "
                    "pass --eos-token to fill it in"
                )
        lines.append(f'TEMPLATE """{tpl.ollama}"""')
        if tpl.default_system:
            lines.append(f'SYSTEM """{tpl.default_system}"""')
        lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in tpl.stop]
        return "\n".join(lines)
    raise UserError(f"unknown format {fmt!r}; use jinja or ollama")
