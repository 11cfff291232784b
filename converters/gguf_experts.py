"""MoE experts on their way to GGUF: llama.cpp keeps one 3-D tensor (experts, out, in) per projection
(`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`). Checkpoints ship one tensor per expert (stacked here) or, saved as
transformers 5 holds them, fused 3-D parameters with gate and up in one (split here by rows).
"""

from __future__ import annotations

import re

import numpy as np

from exporter.errors import UserError

EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<e>\d+)\.(?P<leaf>[^.]+)\.weight$")
FUSED = (".experts.gate_up_proj", ".experts.down_proj")  # transformers 5's fused expert parameters


def group(name: str) -> str | None:
    """The stacked tensor a per-expert tensor belongs to (`...experts.3.w1.weight` -> `...experts.w1.weight`)."""
    m = EXPERT.match(name)
    return None if m is None else f"{m['head']}.{m['leaf']}.weight"


def is_fused(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(FUSED) and len(shape) == 3


def stack_experts(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Names and shapes with one tensor per expert (`...experts.E.w1.weight`, as checkpoints ship them) grouped into
    one stacked tensor per projection (`...experts.w1.weight`, what llama.cpp's names map from): name -> (shape,
    per-expert sources in expert order); other tensors -> (shape, ())."""
    out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    groups: dict[str, dict[int, str]] = {}
    for name, shape in shapes.items():
        key = group(name)
        if key is None:
            out[name] = (shape, ())
            continue
        groups.setdefault(key, {})[int(EXPERT.match(name)["e"])] = name  # type: ignore[index]
        out.setdefault(key, ((), ()))
    for key, by_id in groups.items():
        names = tuple(by_id[e] for e in sorted(by_id))
        if sorted(by_id) != list(range(len(names))) or len({shapes[n] for n in names}) != 1:
            raise UserError(f"experts of {key.removesuffix('.weight')}: expected experts 0..{len(names) - 1} of one "
                            f"shape, got {', '.join(f'{n} {list(shapes[n])}' for n in names[:4])}")  # fmt: skip
        out[key] = ((len(names), *shapes[names[0]]), names)
    return out


def fused_experts(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], np.ndarray | None]]:
    """transformers 5's fused expert parameters saved as they are: gate_up (E, 2*ff, hidden) becomes gate and up
    (rows of each expert's first and second half), down (E, hidden, ff) maps as it is. (HF name, shape, rows)."""
    head, _, leaf = name.rpartition(".")
    if leaf == "down_proj":
        return [(f"{name}.weight", shape, None)]
    n, ff2, hidden = shape
    ff = ff2 // 2
    rows = np.arange(n * ff2).reshape(n, 2, ff)
    return [
        (f"{head}.gate_proj.weight", (n, ff, hidden), rows[:, 0].reshape(-1)),
        (f"{head}.up_proj.weight", (n, ff, hidden), rows[:, 1].reshape(-1)),
    ]
