"""A training run's output dir: checkpoints (`checkpoint-N/`, resumable and usable as an adapter/model dir), where a
run resumes from, and the final outputs written beside them atomically.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter import hf_dir, manifest
from exporter.atomic import TAG, atomic_dir, check_inputs, leftover, locked, settle, tag
from exporter.config import read_json
from exporter.distributed import whole_shape
from exporter.errors import UserError
from exporter.lf_args import TrainConfig, say
from exporter.manifest import MANIFEST_NAME

TRAINER_LOG = "trainer_log.jsonl"
STATE_NAME = "trainer_state.json"
OPTIMIZER, SCHEDULER, RNG = "optimizer.safetensors", "scheduler.json", "rng_state.safetensors"


_FINISHED = ("adapter_model.safetensors", "model.safetensors", "all_results.json")  # a finished run holds one
_STAGED = ".final"  # the final outputs' staging dir (`write_final`): `.final-<tag>`, a name only we write
_STAGED_NAME = re.compile(rf"\.final-{TAG}")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# what a run writes beside its checkpoints, log and manifest (`write_final`): PEFT's and save_pretrained's files, the
# tokenizer, results and plots; a name listed in the manifest is ours only if it is one of these
_WRITTEN = ("adapter_model.safetensors", "adapter_config.json", "README.md", "config.json", "generation_config.json",
            "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "trainer_state.json",
            "all_results.json", "train_results.json", "eval_results.json", "training_*.png", "*.tiktoken",
            *hf_dir.TOKENIZER_FILES)  # fmt: skip


def _written(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _WRITTEN)


def _stale(name: str) -> bool:
    """Whether `name` in output_dir is what a killed run left (never a live one's: output_dir is claimed): the
    final outputs' staging dir `.final-<tag>`, or a temporary or lock file that `atomic` writes for it, for a
    checkpoint or for the manifest (their exact names, `atomic.leftover` / `atomic.locked`). A bare `.final` or a
    `checkpoint-4.old-2` is a user's: older versions' names without the tag are not taken for ours."""
    if _STAGED_NAME.fullmatch(name):
        return True
    found = leftover(name)
    of = found[0] if found else locked(name)
    staged = of is not None and (of == _STAGED or _STAGED_NAME.fullmatch(of) is not None)
    return of is not None and (staged or of == MANIFEST_NAME or _CHECKPOINT.fullmatch(of) is not None)


def _listed(out: Path) -> set[str]:
    """Top-level names that the manifest in `out` lists as a run's outputs (and that a run writes)."""
    try:
        rows = (manifest.read(out) or {}).get("outputs", [])
        names = {Path(str(r["path"])).parts[0] for r in rows if r.get("path")}
    except (TypeError, KeyError, AttributeError, IndexError):
        return set()
    return {n for n in names if _written(n)}


def _ours(out: Path) -> set[str]:
    """Top-level names in `out` that a training run wrote: manifest, log, checkpoint-N dirs, its listed outputs, and
    what killed runs left; anything else (a `checkpoint-best/` copy, notes) is the user's."""
    names = {MANIFEST_NAME, TRAINER_LOG} | _listed(out)
    for p in out.iterdir():
        if (_CHECKPOINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()) or _stale(p.name):
            names.add(p.name)
    return names


def _mark(out: Path, ours: set[str]) -> None:
    """`out` is ours and incomplete while a run writes into it (`manifest.mark`), its outputs already there (a
    finished run being continued, final outputs being moved in) still listed as ours."""
    manifest.mark(out, "train", sorted(ours))


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def check_not_input(cfg: TrainConfig, out: Path, model_dir: Path) -> None:
    """Before output_dir is claimed or touched: it is not, does not hold and does not lie inside an input of the
    run (the base model, adapter_name_or_path, a dataset's file or dir, dataset_info.json), the rule merge, gguf and
    pipeline apply to their outputs (`atomic.check_inputs`)."""
    from exporter import dataset_info

    inputs: list[Path | str] = [model_dir, cfg.model_name_or_path]
    if cfg.adapter_name_or_path:
        inputs += [a.strip() for a in str(cfg.adapter_name_or_path).split(",")]
    info_path = Path(cfg.dataset_dir) / dataset_info.INFO_NAME
    if info_path.is_file():
        info = dataset_info.read_info(Path(cfg.dataset_dir))
        specs = [dataset_info.spec(n, info, Path(cfg.dataset_dir)) for n in [*cfg.dataset, *cfg.eval_dataset]]
        inputs += [info_path, *(sp.source for sp in specs if sp.load_from == "file")]
    check_inputs(out, inputs, "output_dir")


def _incomplete(out: Path) -> bool:
    """Whether the manifest of `out` says a run writing it did not finish (`manifest.mark`)."""
    return (manifest.read(out) or {}).get("complete") is False


def prepare_output(cfg: TrainConfig, out: Path) -> Path | None:
    """Check output_dir (call with it claimed) and return the checkpoint to resume from (explicit, latest, or
    LLaMA-Factory's auto); nothing in it changes here (`begin` does that once the run has started), so a refusal
    leaves it as it was. output_dir must be new, empty, or one of ours (it holds exporter_manifest.json, written
    when a run starts), and hold no file of a name the run writes that is not ours."""
    if cfg.resume_from_checkpoint not in (None, False) and cfg.overwrite_output_dir:
        raise UserError("resume_from_checkpoint and overwrite_output_dir contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file")
    used = out.is_dir() and any(out.iterdir())
    if used and not (out / MANIFEST_NAME).is_file():
        raise UserError(
            f"output_dir {out} is not empty and is not an exporter training output (no {MANIFEST_NAME}); "
            "choose a new or empty dir (nothing in it was changed)"
        )
    if used:
        ours = _ours(out)
        clash = sorted(p.name for p in out.iterdir() if p.name not in ours and _written(p.name))
        if clash:
            raise UserError(
                f"output_dir {out}: {', '.join(clash)} {'is' if len(clash) == 1 else 'are'} not listed in its "
                f"{MANIFEST_NAME} as written by exporter train, and a run writes files of that name; move "
                f"{'it' if len(clash) == 1 else 'them'} out of {out} or choose another output_dir (nothing in it "
                "was changed)"
            )
    if cfg.resume_from_checkpoint is True:
        ckpt = latest(out) if used else None
        if ckpt is None:
            raise UserError(f"resume_from_checkpoint: true, but {out} has no checkpoint-N")
        return ckpt
    if isinstance(cfg.resume_from_checkpoint, str):
        ckpt = Path(cfg.resume_from_checkpoint)
        if not ckpt.is_dir():
            raise UserError(f"resume_from_checkpoint {ckpt}: no such directory")
        return ckpt
    if not used or cfg.overwrite_output_dir:
        return None
    ckpt = latest(out)
    if any((out / n).exists() for n in _FINISHED) and not _incomplete(out):  # killed as its outputs moved in: resumed
        more = f", or resume_from_checkpoint: {ckpt} with a larger max_steps to continue it" if ckpt else ""
        raise UserError(f"output_dir {out} already holds a finished run; set overwrite_output_dir: true to start "
                        f"over{more}")  # fmt: skip
    if ckpt is not None:  # LLaMA-Factory resumes automatically from the last checkpoint
        say(f"resuming from {ckpt} (found in output_dir; set overwrite_output_dir: true to start over)")
    return ckpt


def begin(cfg: TrainConfig, out: Path, resume: Path | None) -> None:
    """Make output_dir ours for the run `prepare_output` planned (call with it claimed, once the run has started):
    remove what killed runs left, with overwrite_output_dir everything a run wrote (naming what it keeps), and
    mark it incomplete until the run's manifest replaces the mark."""
    out.mkdir(parents=True, exist_ok=True)
    listed = _listed(out)
    for p in sorted(out.iterdir()):
        if not _stale(p.name) or not (p.exists() or p.is_symlink()):  # (settled with an earlier name)
            continue
        found = leftover(p.name)
        if found is not None:  # a checkpoint's temporaries: a moved-aside one is put back if it is missing
            settle(out / found[0])
        else:
            _remove(p)
            say(f"removed {p}, left behind by an interrupted run")
    if cfg.overwrite_output_dir and any(out.iterdir()):
        ours, listed = _ours(out), set()
        kept = sorted(p.name for p in out.iterdir() if p.name not in ours)
        for p in out.iterdir():
            if p.name in ours:
                _remove(p)
        if kept:
            say(f"overwrite_output_dir: kept {', '.join(kept)} in {out} (not written by exporter train)")
    if resume is None:
        (out / TRAINER_LOG).unlink(missing_ok=True)
    _mark(out, {n for n in listed if (out / n).exists()})


def save(
    model: Any, optim: dict[str, Any] | None, sched: Any, state: dict[str, Any], out_dir: Path,
    cfg: TrainConfig, model_dir: Path, tpl: Any, base: dict[str, Any], state_dict: dict[str, Any] | None = None,
    rngs: list[Any] | None = None, parts: Callable[[Path], None] | None = None,
    weights: Callable[[Path], None] | None = None,
) -> Path:  # fmt: skip
    """checkpoint-N/: weights, tokenizer (with the training template), optimizer, scheduler, RNG states and the
    trainer state (incl. the data order), so a checkpoint is both resumable and usable as an adapter/model dir.
    Nothing in it can carry code: tensors in safetensors, everything else JSON; its manifest lists every file's
    sha256, checked before a resume reuses it; `base`, the base's `adapter.base_fingerprint`, goes into it for merge
    and gguf to check an adapter against. `state_dict`, `weights`: see `save_model`; `optim`: the optimizer's
    state dict (gathered to rank 0 under DDP), None: weights only, or for a sharded optimizer (FSDP, DeepSpeed)
    `parts`, which has every rank write its own part into the staging dir (`save_part`), before the manifest;
    `rngs`: every rank's `rng_state()` (default: this process's)."""
    path = out_dir / f"checkpoint-{state['global_step']}"
    with atomic_dir(path, force=True) as tmp:
        save_model(model, tmp, state_dict, weights)
        hf_dir.finish(tmp, tpl, model_dir, tokenizer_dir=model_dir)
        if not cfg.save_only_model and (optim is not None or parts is not None):
            from safetensors.torch import save_file

            if parts is not None:
                parts(tmp)
            else:
                _save_optimizer(optim, tmp / OPTIMIZER)
            (tmp / SCHEDULER).write_text(json.dumps(sched.state_dict(), indent=1) + "\n", encoding="utf-8")
            for rank, (tensors, meta) in enumerate(rngs or [rng_state()]):
                save_file(tensors, str(tmp / rng_name(rank)), metadata=meta)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        from exporter.adapter import FINGERPRINT_KEY

        settings = {"global_step": state["global_step"], FINGERPRINT_KEY: base}
        manifest.write(tmp, "checkpoint", inputs={}, settings=settings)
    return path


def save_model(model: Any, tmp: Path, state_dict: dict[str, Any] | None = None,
               weights: Callable[[Path], None] | None = None) -> None:  # fmt: skip
    """The model or adapter into `tmp` through save_pretrained: as it is in memory; or `state_dict`, its weights
    gathered from sharded ranks; or, with `weights` (the model's safetensors streamed from sharded ranks, which all
    call it at this point), save_pretrained's config files and `weights` for the tensors."""
    if weights is not None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict={})
        weights(tmp)
        return
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))


def optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """An optimizer state dict as safetensors: its tensors as `<param>.<key>` (the parameter's index, or its name in a
    state from several ranks; a sharded one's local part), the rest as JSON in the metadata."""
    tensors, other = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if hasattr(value, "detach"):
                value = value.to_local() if hasattr(value, "to_local") else value  # a DTensor: this rank's shard
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                other[f"{idx}.{key}"] = value
    return tensors, {"param_groups": json.dumps(sd["param_groups"]), "other": json.dumps(other)}


def _save_optimizer(sd: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = optimizer_tensors(sd)
    save_file(tensors, str(path), metadata=meta)


def _load_optimizer(path: Path) -> dict[str, Any]:
    return optimizer_state(*_read_tensors(path))


def optimizer_state(tensors: dict[str, Any], meta: dict[str, str]) -> dict[str, Any]:
    """What `optimizer_tensors` wrote, as an optimizer state dict again."""
    flat = dict(tensors)
    flat.update(json.loads(meta.get("other", "{}")))
    groups = param_groups(meta["param_groups"])
    named = any(isinstance(p, str) for g in groups for p in g.get("params", []))
    state: dict[int | str, dict[str, Any]] = {}
    for name, value in flat.items():
        param, key = name.rsplit(".", 1)  # optimizer keys (exp_avg, step) have no dot; parameter names do
        state.setdefault(param if named else int(param), {})[key] = value
    return {"state": state, "param_groups": groups}


def param_groups(text: str) -> list[dict[str, Any]]:
    """An optimizer's param groups as saved in JSON (JSON has no tuples; AdamW's betas are one)."""
    groups = json.loads(text)
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return groups


def optimizer_name(rank: int) -> str:
    """A sharded run's optimizer (FSDP, DeepSpeed) is saved as each rank's own part: rank 0's under the
    single-process name."""
    return OPTIMIZER if rank == 0 else f"optimizer_{rank}.safetensors"


# the metadata key of an optimizer part (its rank): each rank of the run that wrote it reads its own on resume
PART = "part"


def save_part(tmp: Path, rank: int, part: tuple[dict[str, Any], dict[str, str]]) -> None:
    """This rank's own part of a sharded optimizer (`distributed.optimizer_part`), written by the rank itself."""
    from safetensors.torch import save_file

    tensors, meta = part
    save_file(tensors, str(tmp / optimizer_name(rank)), metadata=meta | {PART: str(rank)})


def read_part(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, str]]:
    """This rank's own optimizer part of checkpoint-N (after rank 0 checked its manifest), read by the rank itself."""
    from safetensors import SafetensorError

    name = optimizer_name(rank)
    if not (path / name).is_file():  # rank 0 saw it (its manifest said so): this node does not see rank 0's files
        raise UserError(f"resume_from_checkpoint {path}: process {rank} finds no {name} there (under several nodes "
                        "the checkpoint must be in a directory every node sees)")  # fmt: skip
    try:
        tensors, meta = _read_tensors(path / name)
    except (SafetensorError, OSError) as e:
        raise UserError(f"resume_from_checkpoint {path}: {name} is unreadable ({e})") from None
    if "param_groups" not in meta or meta.get(PART, str(rank)) != str(rank):
        raise UserError(f"resume_from_checkpoint {path}: {name} is not this process's optimizer part (rank {rank})")
    return tensors, meta


def _is_part(path: Path) -> bool:
    """Whether checkpoint-N's optimizer file is rank 0's part of a sharded optimizer (not a whole state)."""
    from safetensors import safe_open

    with safe_open(str(path / OPTIMIZER), framework="pt") as f:
        return PART in (f.metadata() or {})


def rng_name(rank: int) -> str:
    """Rank 0's RNG file keeps the single-process name; every other rank has its own, as HF's Trainer does."""
    return RNG if rank == 0 else f"rng_state_{rank}.safetensors"


def rng_state() -> tuple[dict[str, Any], dict[str, str]]:
    """This process's Python, numpy and torch RNG states: torch's byte tensors, the others as JSON strings."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    meta = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([name, keys.tolist(), pos, has_gauss, gauss]),
    }
    return tensors, meta


def _read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def set_rng(tensors: dict[str, Any], meta: dict[str, str]) -> None:
    """Restore what `rng_state()` returned."""
    import numpy as np
    import torch

    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _legacy(path: Path) -> Any:
    """A `.pt`/`.pth` state from an older checkpoint, loaded only the way that cannot run code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, AttributeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: refusing to load it: it needs more than plain tensors to unpickle ({first[:160]}), and exporter "
            "never runs code from a checkpoint; resume from a checkpoint written by this version, or start over "
            "(overwrite_output_dir: true)"
        ) from None


def latest(out_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint-N in `out_dir`."""
    found = [
        (int(m.group(1)), p) for p in out_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    found = [(n, p) for n, p in found if (p / STATE_NAME).is_file()]
    return max(found)[1] if found else None


def _check_lora_shapes(path: Path, model: Any) -> None:
    """The checkpoint's LoRA tensors are this run's, name for name and shape for shape (PEFT would skip a missing
    one silently and fail on a shape with a traceback)."""
    from peft import get_peft_model_state_dict

    from exporter.safetensors_file import read_header

    saved = get_peft_model_state_dict(model, state_dict=dict(model.named_parameters()))
    want = {k: list(whole_shape(v)) for k, v in saved.items()}
    have = {k: list(e.shape) for k, e in read_header(path / "adapter_model.safetensors").items()}
    for k in sorted(want.keys() | have.keys()):
        if want.get(k) != have.get(k):
            what = (
                "missing from the checkpoint" if k not in have
                else "not part of this run's LoRA" if k not in want
                else f"{have[k]} in the checkpoint and {want[k]} in this run"
            )  # fmt: skip
            raise UserError(
                f"resume_from_checkpoint {path}: tensor {k} is {what}: the checkpoint was saved with other LoRA "
                "settings (lora_rank, lora_target); resume with those, or start over"
            )


@dataclasses.dataclass
class Saved:
    """A checkpoint's contents, checked against its manifest and parsed; nothing applied yet."""

    state: dict[str, Any]  # trainer_state.json
    weights: dict[str, Any]  # the adapter's tensors as saved, or the whole model's
    # None: an older checkpoint's .pt/.pth files (`load` reads them the safe way), or `parts`
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: list[tuple[dict[str, Any], dict[str, str]]]  # per rank
    parts: bool = False  # a sharded optimizer (FSDP, DeepSpeed): each rank reads its own part (`read_part`)


def read(path: Path, cfg: TrainConfig, model: Any, fingerprint: dict[str, Any]) -> Saved:
    """Check and read checkpoint-N for `model` (its LoRA tensors must be this run's) and a run of this
    `fingerprint` (data, batch and optimizer settings, processes)."""
    from safetensors import SafetensorError

    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise UserError(f"resume_from_checkpoint {path}: not a checkpoint ({STATE_NAME} missing)")
    if (path / MANIFEST_NAME).is_file() and (problem := manifest.changed(path)) is not None:
        raise UserError(
            f"resume_from_checkpoint {path}: {problem}; resume from another checkpoint or start over "
            "(overwrite_output_dir: true)"
        )
    new, old = (path / OPTIMIZER).is_file(), (path / "optimizer.pt").is_file()
    if not new and not old:
        raise UserError(f"resume_from_checkpoint {path}: saved with save_only_model, no optimizer state to resume")
    weights = _weights(path, cfg, model)
    state = read_json(state_file)
    _check_same_run(path, state.get("fingerprint"), fingerprint)
    if not new:
        return Saved(state, weights, None, None, [])
    world = fingerprint.get("world", 1)
    try:
        rng = [_read_tensors(path / rng_name(r)) for r in range(world) if r == 0 or (path / rng_name(r)).is_file()]
        if len(rng) < world:  # written before each rank had its own: every rank takes rank 0's, as it did then
            say(f"{path}: one RNG state for {world} processes (an older checkpoint); every process resumes from it")
            rng = rng[:1] * world
        if "deepspeed" in fingerprint or _is_part(path):  # the same world, said by the fingerprint
            return Saved(state, weights, None, read_json(path / SCHEDULER), rng, parts=True)
        return Saved(state, weights, _load_optimizer(path / OPTIMIZER), read_json(path / SCHEDULER), rng)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise _unreadable(path, e) from None


# settings a resume takes from the checkpoint, not from the config (the optimizer's param groups and the scheduler's
# base learning rates are restored): a change would be ignored, so it is refused; the schedule's shape (type, warmup,
# total) is rebuilt from the config
OPTIMIZER_KEYS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "loraplus_lr_ratio",
                  "loraplus_lr_embedding")  # fmt: skip


def _check_same_run(path: Path, saved: Any, now: dict[str, Any]) -> None:
    """A checkpoint resumes a run of the same data, batches, optimizer settings (those it restores, when recorded)
    and processes (the fingerprint); the planned total of steps may change, as HF's Trainer allows (a larger
    max_steps or num_train_epochs continues the run, its learning rate schedule rebuilt for the new total; older
    checkpoints recorded the total in their fingerprint)."""
    saved = {k: v for k, v in saved.items() if k != "total_steps"} if isinstance(saved, dict) else {}
    now = {k: v for k, v in now.items() if k in saved or k not in OPTIMIZER_KEYS}  # older checkpoints: not recorded
    diff = [f"{k} {saved.get(k, '(none)')} in the checkpoint, {now.get(k, '(none)')} now"
            for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]  # fmt: skip
    if diff:
        raise UserError(
            f"resume_from_checkpoint {path}: saved for different data, batch, optimizer or process settings "
            f"({'; '.join(diff)}); resume with those, or start over (overwrite_output_dir: true)"
        )


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"resume_from_checkpoint {path}: its optimizer/scheduler/RNG state is unreadable ({e})")


def _weights(path: Path, cfg: TrainConfig, model: Any) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    if cfg.finetuning_type == "lora":
        _check_lora_shapes(path, model)
        return load_file(path / "adapter_model.safetensors")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).state_dict()


def by_model_key(path: Path, model: Any, weights: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """`Saved.weights` under the names `model.state_dict()` gives them (an adapter's file drops PEFT's adapter name:
    the names are mapped back the way PEFT maps them when saving); a whole model's must fit this one's shapes."""
    own = model.state_dict()
    if cfg.finetuning_type == "lora":
        from peft import get_peft_model_state_dict

        name_of = {id(v): k for k, v in own.items()}
        saved_as = get_peft_model_state_dict(model, state_dict=own)  # the same tensors, under the file's names
        return {name_of[id(v)]: weights[k] for k, v in saved_as.items()}
    shapes = {k: list(v.shape) for k, v in own.items()} | {
        k: list(whole_shape(p)) for k, p in model.named_parameters(remove_duplicate=False)}  # fmt: skip
    for k in sorted(own.keys() | weights.keys()):
        if k not in own or k not in weights or shapes[k] != list(weights[k].shape):
            raise UserError(f"resume_from_checkpoint {path}: its weights do not fit this model (tensor {k})")
    return weights


def load(path: Path, model: Any, opt: Any, sched: Any, cfg: TrainConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from checkpoint-N in one process (see `read`); returns its
    trainer state. Older checkpoints' .pt/.pth files load only with torch's weights_only=True."""
    import numpy as np
    import torch

    saved = read(path, cfg, model, fingerprint)
    if cfg.finetuning_type == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, saved.weights)
    else:
        try:
            model.load_state_dict(saved.weights)
        except RuntimeError as e:
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise UserError(f"resume_from_checkpoint {path}: its weights do not fit this model ({first})") from None
    if saved.optimizer is not None:
        try:
            opt.load_state_dict(saved.optimizer)
            sched.load_state_dict(saved.scheduler)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _unreadable(path, e) from None
        set_rng(*saved.rng[0])
        return saved.state
    opt.load_state_dict(_legacy(path / "optimizer.pt"))
    sched.load_state_dict(_legacy(path / "scheduler.pt"))
    rng = _legacy(path / "rng_state.pth")
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return saved.state


def write_final(out: Path, write: Callable[[Path], None]) -> None:
    """Final outputs into `out` beside its checkpoints and log: `write` fills a staging dir that is completed and
    fsynced by the same atomic helper checkpoints use, then each file is renamed into `out` (listed as ours first,
    so that a run killed in between leaves them known as ours)."""
    staged = out / f"{_STAGED}-{tag()}"
    with atomic_dir(staged, force=True) as tmp:
        write(tmp)
    names = sorted(p.name for p in staged.iterdir())
    _mark(out, _listed(out) | set(names))
    for name in names:
        os.replace(staged / name, out / name)
    staged.rmdir()
