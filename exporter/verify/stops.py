"""Check 2, stops: every end-of-turn token is EOG in each GGUF (declared in its metadata, CONTROL typed, and EOG for
llama.cpp), a `PARAMETER stop` in each Modelfile, and in `generation_config.json` `eos_token_id`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.errors import UserError
from exporter.verify.artifacts import GGUFInfo, GGUFLoadError, Modelfile, gen_eos, load_llama
from exporter.verify.report import Check


def eot_ids(tok: Any, tpl: Any, gen_eos_ids: list[int]) -> dict[str, int]:
    """The end-of-turn tokens and their ids: the template's, else generation_config's eos ids."""
    if tpl is not None:
        out = {}
        for t in tpl.eot_tokens:
            i = tok.convert_tokens_to_ids(t)
            if i is None or (i == tok.unk_token_id and t != tok.unk_token):  # Granite's unk is its eos
                raise UserError(f"end-of-turn token {t!r} of template {tpl.name} is not in the tokenizer")
            out[t] = int(i)
        return out
    return {tok.convert_ids_to_tokens(i): i for i in gen_eos_ids}


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


def _check_gguf(eot: dict[str, int], g: GGUFInfo) -> Check:
    from gguf import TokenType

    declared = set(g.eog_ids.values()) | set(g.eos_ids)
    problems = []
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
    if not problems:
        try:
            import llama_cpp

            llm = load_llama(g, vocab_only=True)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            not_eog = [t for t, i in eot.items() if not llama_cpp.llama_vocab_is_eog(vocab, i)]
            if not_eog:
                problems.append(f"llama.cpp does not treat {', '.join(not_eog)} as end-of-generation")
            llm.close()
        except GGUFLoadError as e:
            problems.append(str(e))
    detail = "; ".join(problems) or f"{', '.join(eot)} end generation (metadata and llama.cpp)"
    return Check("stops", g.path.name, "fail" if problems else "pass", detail, {"eot_ids": eot, "metadata": g.eog_ids})


def _check_modelfile(eot: dict[str, int], mf: Modelfile) -> Check:
    missing = [t for t in eot if t not in mf.stops]
    detail = (
        f"no PARAMETER stop for {', '.join(missing)} (stops: {mf.stops})"
        if missing
        else f"PARAMETER stop for {', '.join(eot)}"
    )
    return Check("stops", mf.path.name, "fail" if missing else "pass", detail, {"stops": mf.stops})


def check_stops(
    eot: dict[str, int], merged: Path | None, ggufs: list[GGUFInfo], modelfiles: list[Modelfile]
) -> list[Check]:
    """Every end-of-turn token: in generation_config eos_token_id, EOG in each GGUF, a stop in each Modelfile."""
    checks = [_check_generation_config(eot, merged)] if merged is not None else []
    checks += [_check_gguf(eot, g) for g in ggufs]
    checks += [_check_modelfile(eot, mf) for mf in modelfiles]
    return checks
