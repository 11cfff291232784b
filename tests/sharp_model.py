"""A fixture model that gives varied greedy answers: a tiny model with every weight matrix scaled up.

The plain tiny models are random with small weights, so they answer the same letter to every question and the same
token over and over; x10 makes their outputs depend on the input, which a comparison needs to prove anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def sharpen(src: Path, out: Path, factor: float = 10.0, eos_only: bool = False) -> Path:
    """Write `src` with its 2-D weights x`factor` (fp32) to `out`. `eos_only`: generation_config's eos is the
    tokenizer's eos alone (LLaMA-Factory's predict stops at that token only)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(src)
    tok.save_pretrained(out)
    for name in ("generation_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    if eos_only:
        gen = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
        gen["eos_token_id"] = tok.eos_token_id
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return out
