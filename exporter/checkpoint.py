"""A training run's output dir: checkpoints (`checkpoint-N/`, resumable and usable as an adapter/model dir), where a
run resumes from, and the final outputs written beside them atomically.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.atomic import atomic_dir
from exporter.config import read_json
from exporter.errors import UserError
from exporter.lf_args import TrainConfig, say

TRAINER_LOG = "trainer_log.jsonl"
STATE_NAME = "trainer_state.json"


def prepare_output(cfg: TrainConfig, out: Path) -> Path | None:
    """Check/clean output_dir; return the checkpoint to resume from (explicit, latest, or LLaMA-Factory's auto)."""
    finished = ("adapter_model.safetensors", "model.safetensors", "all_results.json")
    if cfg.resume_from_checkpoint not in (None, False) and cfg.overwrite_output_dir:
        raise UserError("resume_from_checkpoint and overwrite_output_dir contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file")
    if out.is_dir() and cfg.overwrite_output_dir and any(out.iterdir()):
        ours = any((out / n).exists() for n in (TRAINER_LOG, "exporter_manifest.json", *finished))
        if not ours and not list(out.glob("checkpoint-*")):
            raise UserError(f"output_dir {out} is not empty and does not look like a training output; not deleting it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume_from_checkpoint is True:
        ckpt = latest(out)
        if ckpt is None:
            raise UserError(f"resume_from_checkpoint: true, but {out} has no checkpoint-N")
        return ckpt
    if isinstance(cfg.resume_from_checkpoint, str):
        ckpt = Path(cfg.resume_from_checkpoint)
        if not ckpt.is_dir():
            raise UserError(f"resume_from_checkpoint {ckpt}: no such directory")
        return ckpt
    ckpt = latest(out)
    if any((out / n).exists() for n in finished):
        raise UserError(f"output_dir {out} already holds a finished run; set overwrite_output_dir: true")
    if ckpt is not None:  # LLaMA-Factory resumes automatically from the last checkpoint
        say(f"resuming from {ckpt} (found in output_dir; set overwrite_output_dir: true to start over)")
        return ckpt
    if (out / TRAINER_LOG).exists():
        (out / TRAINER_LOG).unlink()
    return None


def save(
    model: Any, opt: Any, sched: Any, state: dict[str, Any], out_dir: Path, cfg: TrainConfig, model_dir: Path, tpl: Any
) -> Path:
    """checkpoint-N/: weights, tokenizer (with the training template), optimizer, scheduler, RNG states and the
    trainer state (incl. the data order), so a checkpoint is both resumable and usable as an adapter/model dir."""
    import numpy as np
    import torch

    from exporter import hf_dir

    path = out_dir / f"checkpoint-{state['global_step']}"
    with atomic_dir(path, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_dir.finish(tmp, tpl, model_dir, tokenizer_dir=model_dir)
        if not cfg.save_only_model:
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            torch.save(sched.state_dict(), tmp / "scheduler.pt")
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng_state.pth")
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    return path


def latest(out_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint-N in `out_dir`."""
    found = [
        (int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    found = [(n, p) for n, p in found if (p / STATE_NAME).is_file()]
    return max(found)[1] if found else None


def load(path: Path, model: Any, opt: Any, sched: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from checkpoint-N; returns its trainer state."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise UserError(f"resume_from_checkpoint {path}: not a checkpoint ({STATE_NAME} missing)")
    if not (path / "optimizer.pt").is_file():
        raise UserError(f"resume_from_checkpoint {path}: saved with save_only_model, no optimizer state to resume")
    state = read_json(state_file)
    if cfg.finetuning_type == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng_state.pth", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def write_final(out: Path, write: Callable[[Path], None]) -> None:
    """Final outputs into `out` beside its checkpoints and log: `write` fills a staging dir that is completed and
    fsynced by the same atomic helper checkpoints use, then each file is renamed into `out`."""
    staged = out / ".final"
    with atomic_dir(staged, force=True) as tmp:
        write(tmp)
    for p in sorted(staged.iterdir()):
        os.replace(p, out / p.name)
    staged.rmdir()
