"""Check 2, stops: every end-of-turn token is EOG in each GGUF (declared in its metadata, CONTROL typed, and EOG for
llama.cpp), a `PARAMETER stop` in each Modelfile, and in `generation_config.json` `eos_token_id`. And nothing else
ends generation: each GGUF's bos/eos/eot/eom ids are the HF tokenizer's and the template's, and every token
llama.cpp treats as end-of-generation (and every id Ollama stops on, tokenizer.ggml.eos_token_ids) is one of those, or
a special token llama.cpp picks by its name (FIM pad, <|endoftext|> ..., reported), never an ordinary text token; and
a Modelfile's `PARAMETER stop` strings are the template's stops or special tokens, never ordinary text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.verify.artifacts import GGUFInfo, GGUFLoadError, Modelfile, Vocab, gen_eos
from exporter.verify.report import Check


def eot_ids(tok: Any, tpl: Any, gen_eos_ids: list[int]) -> dict[str, int]:
    """The end-of-turn tokens and their ids: the template's, else generation_config's eos ids."""
    if tpl is not None and tpl.eot_tokens:
        out = {}
        for t in tpl.eot_tokens:
            i = tok.convert_tokens_to_ids(t)
            if i is None or (i == tok.unk_token_id and t != tok.unk_token):  # Granite's unk is its eos
                raise UserError(f"end-of-turn token {t!r} of template {tpl.name} is not in the tokenizer")
            out[t] = int(i)
        return out
    return {tok.convert_ids_to_tokens(i): i for i in gen_eos_ids}


def expected_eog(tok: Any, eot: dict[str, int], gen_eos_ids: list[int]) -> dict[int, str]:
    """Ids that may end generation: the end-of-turn tokens, the tokenizer's eos, generation_config's eos ids."""
    out = {i: t for t, i in eot.items()}
    if tok.eos_token_id is not None:
        out.setdefault(int(tok.eos_token_id), tok.eos_token)
    for i in gen_eos_ids:
        out.setdefault(int(i), tok.convert_ids_to_tokens(int(i)))
    return out


def _check_generation_config(eot: dict[str, int], merged: Path) -> Check:
    gen = gen_eos(merged)
    missing = [t for t, i in eot.items() if i not in (gen or [])]
    detail = (
        f"generation_config.json eos_token_id {gen} lacks {', '.join(f'{t} ({eot[t]})' for t in missing)}"
        if missing
        else f"eos_token_id {gen} includes {', '.join(eot)}"
    )
    metrics = {"eos_token_id": gen, "eot_ids": eot}
    return Check("stops", "generation_config.json", "fail" if missing else "pass", detail, metrics)


def _name(g: GGUFInfo, i: int) -> str:
    return f"{g.tokens[i]!r} ({i})" if 0 <= i < len(g.tokens) else f"id {i} (out of the vocabulary)"


def _special_ids(g: GGUFInfo, tok: Any, expected: dict[int, str]) -> list[str]:
    """The GGUF's bos id is the HF tokenizer's; its eos/eot/eom ids and every id of tokenizer.ggml.eos_token_ids (what
    Ollama stops on) are expected end-of-generation tokens."""
    problems = []
    if tok.bos_token_id is not None and g.bos_id is not None and g.bos_id != tok.bos_token_id:
        problems.append(f"bos id is {_name(g, g.bos_id)}, the HF tokenizer's is {tok.bos_token!r} ({tok.bos_token_id})")
    want = ", ".join(f"{t!r} ({j})" for j, t in expected.items())
    for key, i in g.eog_ids.items():
        if i not in expected:
            problems.append(f"{key} id is {_name(g, i)}, not an end-of-turn or eos token of the model ({want})")
    for i in dict.fromkeys(g.eos_ids):  # Ollama's engine stops on each of these besides eos (llama.cpp reads none)
        if i not in expected:
            problems.append(
                f"tokenizer.ggml.eos_token_ids holds {_name(g, i)}, which Ollama stops on: not an end-of-turn or eos "
                f"token of the model ({want})"
            )
    return problems


def _eog_set(g: GGUFInfo, expected: dict[int, str]) -> tuple[list[str], list[str]]:
    """(problems, notes) from the set of ids llama.cpp treats as end-of-generation: an expected one missing, or an
    ordinary token among them, is a problem; a control token llama.cpp adds by its name is a note."""
    from gguf import TokenType

    vocab = Vocab(g)
    try:
        eog = {i for i in range(vocab.n_tokens()) if vocab.is_eog(i)}
    finally:
        vocab.close()
    problems = [f"llama.cpp does not treat {_name(g, i)} as end-of-generation" for i in expected if i not in eog]
    notes = []
    for i in sorted(eog - set(expected)):
        kind = TokenType(g.token_types[i]) if g.token_types and i < len(g.token_types) else TokenType.NORMAL
        if kind == TokenType.NORMAL:
            problems.append(f"{_name(g, i)}, an ordinary text token, ends generation")
        else:
            notes.append(f"llama.cpp also ends generation on {kind.name.lower()} token {_name(g, i)} (by its name)")
    return problems, notes


def _check_gguf(eot: dict[str, int], g: GGUFInfo, tok: Any, expected: dict[int, str]) -> Check:
    from gguf import TokenType

    declared = set(g.eog_ids.values()) | set(g.eos_ids)
    problems, notes = [], []
    for t, i in eot.items():
        if i >= len(g.tokens) or g.tokens[i] != t:
            problems.append(f"token {i} is {g.tokens[i] if i < len(g.tokens) else None!r}, not {t!r}")
            continue
        if i not in declared:
            problems.append(
                f"{t} ({i}) is not declared end-of-generation in the metadata (eos/eot/eom ids: {g.eog_ids or 'none'})"
            )
        if g.token_types and g.token_types[i] != TokenType.CONTROL:
            problems.append(f"{t} ({i}) has token type {TokenType(g.token_types[i]).name}, expected CONTROL")
    problems += _special_ids(g, tok, expected)
    try:
        more, notes = _eog_set(g, expected)
        problems += more
    except GGUFLoadError as e:
        problems.append(str(e))
    names = ", ".join(f"{t!r}" for t in expected.values())
    detail = "; ".join(problems) or "; ".join([f"exactly {names} end generation (metadata and llama.cpp)", *notes])
    metrics = {"eot_ids": eot, "metadata": g.eog_ids, "expected_eog": expected}
    return Check("stops", g.path.name, "fail" if problems else "pass", detail, metrics)


def _check_modelfile(eot: dict[str, int], mf: Modelfile, allowed: set[str] | None) -> Check:
    """Every end-of-turn token is a PARAMETER stop; with `allowed` (the template's stops, the end-of-turn and the
    tokenizer's special tokens), a stop that is none of them is ordinary text Ollama would end every answer at."""
    missing = [t for t in eot if t not in mf.stops]
    extra = [s for s in mf.stops if allowed is not None and s not in allowed]
    problems = [f"no PARAMETER stop for {', '.join(missing)} (stops: {mf.stops})"] if missing else []
    problems += [
        f"PARAMETER stop {s!r} is neither a stop of the template nor a special token: Ollama ends every answer at "
        f"its first {s!r}"
        for s in extra
    ]
    detail = "; ".join(problems) or f"PARAMETER stop for {', '.join(eot)}"
    return Check("stops", mf.path.name, "fail" if problems else "pass", detail, {"stops": mf.stops})


def check_stops(
    eot: dict[str, int],
    merged: Path | None,
    ggufs: list[GGUFInfo],
    modelfiles: list[Modelfile],
    tok: Any,
    gen_eos_ids: list[int],
    template_stops: Sequence[str] | None = None,
) -> list[Check]:
    """Every end-of-turn token: in generation_config eos_token_id, EOG in each GGUF, a stop in each Modelfile; and no
    other token ends generation in a GGUF, no ordinary text in a Modelfile (given the template's `stop` strings)."""
    expected = expected_eog(tok, eot, gen_eos_ids)
    checks = [_check_generation_config(eot, merged)] if merged is not None else []
    checks += [_check_gguf(eot, g, tok, expected) for g in ggufs]
    allowed = None
    if template_stops is not None:
        allowed = {*template_stops, *eot, *expected.values(), *tok.all_special_tokens, *tok.get_added_vocab()}
    checks += [_check_modelfile(eot, mf, allowed) for mf in modelfiles]
    return checks
