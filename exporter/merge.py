"""`exporter merge`: fold LoRA adapters into a base model, one tensor (block of rows) at a time.

Peak memory is one block of rows of one tensor plus the adapters, never the model: base shards are read by offset,
every matching adapter change is applied in float32 (PEFT's formulas: `W + (B @ A) * scale`, DoRA's magnitude over
the merged weight's norm, embedding LoRA, `modules_to_save`), the result is cast once to the output dtype and
appended to an output shard whose header was planned up front.

Several adapters are applied in order, each to the weights the previous one produced; `weight` multiplies an
adapter's LoRA scale (for plain LoRA that is its delta), and for a whole replaced tensor (`modules_to_save`) it
interpolates `W + weight * (saved - W)`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter import atomic, hf_dir, hub
from exporter.adapter import (
    Adapter,
    ExpertLora,
    LoraPart,
    Source,
    check_base,
    expert_targets,
    load_adapter,
    match_tensor,
)
from exporter.config import read_json
from exporter.errors import UserError
from exporter.shards import (
    PlannedTensor,
    ShardWriter,
    TensorInfo,
    itemsize,
    numel,
    parse_size,
    read_header,
    read_rows,
    write_shards,
)

OUT_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_CONFIG_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_ELEMS = 4 * 2**20  # rows are processed in blocks of about this many elements (16 MiB in float32)
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_HEAD = "lm_head.weight"


# ---------------------------------------------------------------------------------------------------------------
# base model and planning


def _base_tensors(base: Path) -> dict[str, TensorInfo]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e})") from None
    elif (base / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"base {base}: no model.safetensors or model.safetensors.index.json (safetensors needed)")
    out: dict[str, TensorInfo] = {}
    for name in files:
        path = base / name
        if not path.is_file():
            raise UserError(f"base {base}: shard {name} named in the index is missing")
        infos = read_header(path)
        out.update(sorted(infos.items(), key=lambda kv: kv[1].start))
    return out


@dataclass
class Op:
    adapter: Adapter
    lora: LoraPart | ExpertLora | None = None
    full: Source | None = None
    bias: bool = False  # lora bias applied to a bias vector


@dataclass
class Job:
    name: str
    base: TensorInfo
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    ops: list[Op] = field(default_factory=list)


@dataclass
class Plan:
    jobs: list[Job]
    untied: list[str]
    vocab_size: int | None
    tied: bool


def _tie_flag(config: dict) -> bool:
    """tie_word_embeddings as transformers would read it (class default when the key is absent)."""
    for cfg in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        model_type = config.get("model_type")
        if model_type:
            c = AutoConfig.for_model(model_type)
            return bool(getattr(c.get_text_config(), "tie_word_embeddings", False))
    except Exception:
        pass
    return False


def plan(base_dir: Path, adapters: list[Adapter], out_dtype: torch.dtype | None) -> Plan:
    """Decide every output tensor and the ordered changes to it; all shape checks happen here, before writing."""
    base = _base_tensors(base_dir)
    config = read_json(base_dir / "config.json", optional=True)
    embed = next((n for n in base if n.endswith(_EMBED_SUFFIXES)), None)
    tied = embed is not None and _tie_flag(config)

    jobs: dict[str, Job] = {}
    for name, info in base.items():
        dt = out_dtype if (out_dtype is not None and info.dtype in _FLOATS) else info.dtype
        jobs[name] = Job(name, info, info.shape, dt)
    head_virtual = tied and _HEAD not in base
    if head_virtual:  # the head shares the embedding's tensor: a job that only gets written if someone changes it
        info = base[embed]
        jobs[_HEAD] = Job(_HEAD, info, info.shape, jobs[embed].out_dtype)

    def target(name: str, ad: Adapter, what: str) -> Job:
        hit = match_tensor(name, jobs)
        if hit is None:
            raise UserError(f"adapter {ad.label}: {what} {name} is absent from the base model {base_dir}")
        return jobs[hit]

    resized: dict[str, int] = {}
    for ad in adapters:
        for name, src in ad.full.items():
            job = target(name, ad, "saved module tensor")
            vocab_resize = job.name in (embed, _HEAD) and len(src.shape) == 2 and src.shape[1:] == job.shape[1:]
            if src.shape != job.shape and not vocab_resize:
                raise UserError(
                    f"adapter {ad.label} is for another base: tensor {job.name} is {list(src.shape)} in the "
                    f"adapter but {list(job.shape)} in the base"
                )
            if src.shape != job.shape:
                if ad.weight != 1.0:
                    raise UserError(f"adapter {ad.label} resizes {job.name}; it can only be merged with weight 1")
                resized[job.name] = src.shape[0]
                job.shape = src.shape
            job.ops.append(Op(ad, full=src))
        for mod, part in ad.lora.items():
            job = target(f"{mod}.weight", ad, "target module")
            shape = job.shape
            if len(shape) != 2:
                raise UserError(f"adapter {ad.label}: target {job.name} is {list(shape)}, expected a 2-D weight")
            if part.embedding:
                want = (part.A.shape[1], part.B.shape[0])
            elif part.fan_in_fan_out:
                want = (part.A.shape[1], part.B.shape[0])
            else:
                want = (part.B.shape[0], part.A.shape[1])
            if tuple(shape) != want:
                raise UserError(
                    f"adapter {ad.label} is for another base: tensor {job.name} is {list(shape)} in the base but "
                    f"the adapter's LoRA for {mod} needs {list(want)}"
                )
            if part.magnitude is not None:
                cols = shape[1] if (part.embedding or part.fan_in_fan_out) else shape[0]
                if part.magnitude.numel() != cols:
                    raise UserError(
                        f"adapter {ad.label} is for another base: DoRA magnitude of {mod} has {part.magnitude.numel()}"
                        f" entries, tensor {job.name} needs {cols}"
                    )
            job.ops.append(Op(ad, lora=part))
            if part.bias is not None:
                bjob = target(f"{mod}.bias", ad, "bias of target module")
                if tuple(bjob.shape) != tuple(part.bias.shape):
                    raise UserError(
                        f"adapter {ad.label} is for another base: bias {bjob.name} is {list(bjob.shape)} in the base, "
                        f"lora_B bias is {list(part.bias.shape)}"
                    )
                bjob.ops.append(Op(ad, lora=part, bias=True))
        for ex in ad.experts.values():
            for job, op in _expert_ops(ad, ex, jobs, base_dir):
                job.ops.append(op)

    untied: list[str] = []
    if tied and embed is not None and (jobs[embed].ops or jobs[_HEAD].ops):
        untied = sorted({op.adapter.label for n in (embed, _HEAD) for op in jobs[n].ops})
    elif head_virtual:
        del jobs[_HEAD]

    vocab = None
    if resized:
        sizes = {n: jobs[n].shape[0] for n in (embed, _HEAD) if n in jobs}
        if len(set(sizes.values())) != 1:
            detail = ", ".join(f"{n} {s} rows" for n, s in sizes.items())
            raise UserError(f"the adapters resize the vocabulary inconsistently: {detail}")
        vocab = next(iter(sizes.values()))
    return Plan(list(jobs.values()), untied, vocab, tied)


def _expert_ops(ad: Adapter, ex: ExpertLora, jobs: dict[str, Job], base_dir: Path) -> list[tuple[Job, Op]]:
    """Where a parameter LoRA on fused experts lands (`adapter.expert_targets`): the whole LoRA on a fused tensor,
    rows of one expert's change on each per-expert tensor."""
    shapes = {n: j.shape for n, j in jobs.items()}
    hits = expert_targets(ex, shapes, f"adapter {ad.label}", base_dir)
    return [(jobs[n], Op(ad, lora=ex if e is None else ex.part(e, r0, r1))) for n, e, r0, r1 in hits]


# ---------------------------------------------------------------------------------------------------------------
# execution


def _finite(cur: torch.Tensor, out: torch.Tensor) -> bool:
    """All values finite after the cast: a float32 sum is non-finite if any element is (elementwise check only then),
    and a float16 cast overflows exactly when some |value| rounds past float16's largest number."""
    if not torch.isfinite(cur.sum()) and not torch.isfinite(cur).all():
        return False
    if out.dtype == torch.float16 and cur.numel() and cur.abs().amax() >= 65520.0:
        return False
    return True


def _run_job(job: Job, writer: ShardWriter, advance: Callable[[int], None]) -> None:
    """Stream one tensor through its changes, block of rows by block of rows."""
    if not job.ops:
        rows = job.shape[0] if job.shape else 1
        row_elems = numel(job.shape[1:]) if job.shape else 1
        step = max(1, _CHUNK_ELEMS // max(row_elems, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            writer.write(read_rows(job.base, r0, r1).to(job.out_dtype))
            advance((r1 - r0) * row_elems * itemsize(job.out_dtype))
        return
    start = 0
    for i, op in enumerate(job.ops):
        if op.full is not None and op.adapter.weight == 1.0:
            start = i  # an exact replacement: nothing before it matters
    ops = job.ops[start:]
    rows = job.shape[0] if job.shape else 1
    row_elems = numel(job.shape[1:]) if job.shape else 1
    whole = len(job.shape) < 2 or any(op.lora is not None and op.lora.whole() for op in ops)
    step = rows if whole else max(1, _CHUNK_ELEMS // max(row_elems, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if ops[0].full is not None and ops[0].adapter.weight == 1.0:
            cur, ops_here = ops[0].full.rows(r0, r1).to(torch.float32, copy=True), ops[1:]
        else:
            cur, ops_here = read_rows(job.base, r0, r1).to(torch.float32), ops
        for op in ops_here:
            if op.full is not None:
                cur = cur + op.adapter.weight * (op.full.rows(r0, r1).to(torch.float32) - cur)
            elif op.bias:
                cur = cur + op.lora.bias * op.lora.scale
            else:
                cur = op.lora.apply(cur, r0, r1)
        out = cur.to(job.out_dtype)
        if not _finite(cur, out):
            labels = ", ".join(dict.fromkeys(op.adapter.label for op in job.ops))
            raise UserError(
                f"tensor {job.name}: non-finite values (inf/nan) after merging {labels} in "
                f"{str(job.out_dtype).removeprefix('torch.')}"
            )
        writer.write(out)
        advance((r1 - r0) * row_elems * itemsize(job.out_dtype))


def _tokenizer_source(base: Path, adapters: list[Adapter]) -> Path:
    """Where the merged model's tokenizer comes from (`hf_dir.tokenizer_source`)."""
    return hf_dir.tokenizer_source(base, [a.path for a in adapters])


def _copy_tokenizer(base: Path, adapters: list[Adapter], out: Path) -> None:
    """Tokenizer files verbatim from `_tokenizer_source`; a lone chat_template.jinja in an adapter dir overrides."""
    src = _tokenizer_source(base, adapters)
    hf_dir.copy_tokenizer(src, out)
    for a in adapters:
        if a.path != src and not a.has_tokenizer and (a.path / "chat_template.jinja").is_file():
            shutil.copyfile(a.path / "chat_template.jinja", out / "chat_template.jinja")


def _write_configs(base: Path, out: Path, p: Plan, out_dtype: torch.dtype | None) -> None:
    config = read_json(base / "config.json", optional=True)
    if not config:
        raise UserError(f"base {base}: missing config.json")
    subs = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    if p.untied:
        for c in subs:
            c["tie_word_embeddings"] = False
        config["tie_word_embeddings"] = False
    if p.vocab_size is not None:
        for c in subs:
            if "vocab_size" in c:
                c["vocab_size"] = p.vocab_size
    if out_dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for k in keys:
            config[k] = _CONFIG_DTYPE[out_dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_template(src: Path, name: str) -> None:
    """A `--template` the user asked for, checked against the tokenizer the merged model will carry (`src`) before
    any work: a known name whose end-of-turn tokens (an LF name: every token it needs) are in that vocabulary."""
    from exporter import templates

    tpl = templates.resolve(src, name, need=False)  # unknown names; an LF name's tokens (naming `src`)
    vocab = hf_dir.vocabulary(src)
    missing = [t for t in tpl.eot_tokens if vocab is not None and t not in vocab]
    if missing:
        raise UserError(
            f"template {tpl.name!r} ends assistant turns with {missing[0]!r}, but the tokenizer of {src} has no such "
            "token; pick the family that matches this tokenizer with --template"
        )


def _qlora_check(base_dir: Path, ads: list[Adapter]) -> list[str]:
    """A QLoRA adapter merges into the original 16-bit base, never into dequantized 4/8-bit weights: refuse a
    quantized base; the notes to print for adapters `exporter train` trained on a quantized base."""
    from exporter import manifest

    qc = hf_dir.quant_method(base_dir)
    if qc and not ads:
        raise UserError(f"model {base_dir} is a quantized model ({qc}): exporter "
                        "re-saves only 16/32-bit weights; export the original model")  # fmt: skip
    if qc:
        raise UserError(
            f"base {base_dir} is a quantized model ({qc}): merge into the original "
            "16-bit base (a QLoRA adapter too: it was trained on a quantization of that base, not on these weights)"
        )
    notes = []
    for ad in ads:
        trained = read_json(ad.path / manifest.MANIFEST_NAME, optional=True).get("settings", {})
        if trained.get("quantization_bit"):
            kind = f"{trained['quantization_bit']}-bit" + (
                f" {trained.get('quantization_type')}" if trained["quantization_bit"] == 4 else ""
            )
            notes.append(f"note: adapter {ad.label} was trained with QLoRA on a {kind} quantization of its base; "
                         f"merging it into the original 16-bit weights of {base_dir}, not into dequantized {kind} "
                         "weights")  # fmt: skip
    return notes


def _init_note(ad: Adapter) -> str:
    """What merging an adapter with a base-changing init (PiSSA, OLoRA) does, said once."""
    how = "randomized SVD: close to, not exactly, the residual training started from" if "_niter_" in str(
        ad.init) else "exactly as training did"  # fmt: skip
    note = (f"note: adapter {ad.label} has init_lora_weights={ad.init}: its LoRA applies to the base minus the top-r "
            f"part PEFT removed at training; that residual is recomputed as PEFT does on load ({how})")  # fmt: skip
    if "_niter_" in str(ad.init) and (ad.path / "pissa_converted" / "adapter_config.json").is_file():
        note += f"; {ad.path / 'pissa_converted'} (LLaMA-Factory's pissa_convert) merges exactly"
    return note


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg, highlight=False, soft_wrap=True)  # one line per message, never re-wrapped


@dataclass
class MergeOptions:
    """What `exporter merge` takes (CLI flags, the pipeline's `merge:` block, LLaMA-Factory's export YAML)."""

    base: str  # local HF dir or hub id
    adapters: list[str]  # applied in order
    out: str
    weights: list[float] | None = None  # one per adapter (default 1)
    dtype: str | None = None  # bf16 | fp16 | fp32 (default: the base's)
    max_shard_size: str = "2GB"
    template: str | None = None  # chat-template family to write (default: detected)
    force: bool = False
    modelfile: bool = False  # also an Ollama Modelfile `FROM .` in the output (LLaMA-Factory's export writes one)


def _write_modelfile(out: Path, tpl: Any, source: str) -> None:
    """The Ollama Modelfile `FROM .` of a merged dir; one that Ollama's parser would not read back as written (an
    unprintable character in the template) is a note, never a failed merge."""
    from exporter import gguf

    try:
        (out / "Modelfile").write_text(gguf.dir_modelfile(tpl, source, out), encoding="utf-8")
    except UserError as e:
        from rich.markup import escape

        _say(f"note: no Modelfile written: {escape(str(e))}")


@dataclass
class MergeResult:
    """What `merge` wrote."""

    out: Path
    shards: int
    template: str
    untied: list[str]  # adapters that changed a tied embedding/lm_head (both are written)
    vocab_size: int | None  # when an adapter resized the vocabulary


def check_options(o: MergeOptions, need_adapter: bool = True) -> tuple[list[float], torch.dtype | None, int]:
    """Validated (weights, output dtype, shard bytes)."""
    if need_adapter and not o.adapters:
        raise UserError("give at least one --adapter")
    weights = list(o.weights) if o.weights else [1.0] * len(o.adapters)
    if len(weights) != len(o.adapters):
        raise UserError(f"{len(weights)} --weight values for {len(o.adapters)} adapters; give one per adapter or none")
    for w in weights:
        if not math.isfinite(w):
            raise UserError(f"--weight {w}: must be a finite number")
    out_dtype = None
    if o.dtype is not None:
        if str(o.dtype).lower() not in OUT_DTYPES:
            raise UserError(f"--dtype {o.dtype!r}: expected one of bf16, fp16, fp32")
        out_dtype = OUT_DTYPES[str(o.dtype).lower()]
    shard_bytes = parse_size(o.max_shard_size)
    if shard_bytes <= 0:
        raise UserError(f"--max-shard-size {o.max_shard_size!r}: must be positive")
    return weights, out_dtype, shard_bytes


def _write_shards(tmp: Path, p: Plan, shard_bytes: int) -> int:
    """Every planned tensor streamed into safetensors shards (+ index when several); returns the shard count."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    planned = [PlannedTensor(j.name, j.out_dtype, j.shape) for j in p.jobs]
    jobs = {j.name: j for j in p.jobs}
    columns = (TextColumn("[bold]merge[/] {task.fields[tensor]}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("merge", total=sum(t.nbytes for t in planned), tensor="")

        def fill(t: PlannedTensor, writer: ShardWriter) -> None:
            bar.update(task, tensor=t.name)
            _run_job(jobs[t.name], writer, lambda n: bar.advance(task, n))

        return write_shards(tmp, planned, shard_bytes, fill)


def merge(opts: MergeOptions, need_adapter: bool = True) -> MergeResult:
    """Merge the adapters (applied in order, each scaled by its weight) into the base; write an HF dir at `out`.
    Every check runs before the first line is printed. `need_adapter=False` (LF's export of a full model): no
    adapters re-saves the base, cast to `dtype`, in `max_shard_size` shards, with the template."""
    from exporter import manifest, templates

    out = Path(opts.out)
    weights, out_dtype, shard_bytes = check_options(opts, need_adapter)
    base_dir = hub.resolve(opts.base, "base model")
    paths = [hub.resolve(a, "adapter") for a in opts.adapters]
    atomic.check_target(out, opts.force, [base_dir, *paths])  # never an --out that is, holds or lies in an input
    manifest.check_stage(out, "merge")  # --force replaces a previous merge only
    ads = []
    for i, (a, w, path) in enumerate(zip(opts.adapters, weights, paths, strict=True)):
        ads.append(load_adapter(path, float(w), label=str(a) if len(opts.adapters) == 1 else f"#{i + 1} {a}"))
    hf_dir.check_loadable(base_dir, _tokenizer_source(base_dir, ads), model=False)  # one line, before any shard
    notes = [n for ad in ads if (n := check_base(ad.path, base_dir, ad.label))]
    notes += _qlora_check(base_dir, ads)
    notes += [_init_note(ad) for ad in ads if ad.init is not None]
    p = plan(base_dir, ads, out_dtype)
    if p.vocab_size is not None and not any(a.has_tokenizer for a in ads):
        raise UserError(f"the adapters resize the vocabulary to {p.vocab_size} but no adapter dir has tokenizer files")
    forced = opts.template not in (None, "auto")  # a template the user asked for must fit the tokenizer
    if forced:
        _check_template(_tokenizer_source(base_dir, ads), str(opts.template))
    total = sum(PlannedTensor(j.name, j.out_dtype, j.shape).nbytes for j in p.jobs)
    atomic.check_free_space(out.parent if out.parent != Path("") else Path("."), total + 50 * 2**20)
    from rich.markup import escape  # paths and template notes may hold [INST]-like brackets

    for note in notes:
        _say(escape(note))
    if p.untied:
        _say(
            f"note: {', '.join(p.untied)} change(s) the tied embedding/lm_head; writing both tensors and setting "
            "tie_word_embeddings to false"
        )
    if p.vocab_size is not None:
        _say(f"note: vocabulary resized to {p.vocab_size} by the adapter; tokenizer taken from the adapter dir")
    with atomic.atomic_dir(out, opts.force, [base_dir, *paths], need=total) as tmp:
        n_shards = _write_shards(tmp, p, shard_bytes)
        _write_configs(base_dir, tmp, p, out_dtype)
        for py in base_dir.glob("*.py"):  # remote-code models need their modeling files
            shutil.copyfile(py, tmp / py.name)
        _copy_tokenizer(base_dir, ads, tmp)
        tpl = templates.resolve(tmp, opts.template, need=False)
        for note in tpl.notes:
            _say(f"[dim]{escape(note)}[/]")
        inputs: dict[str, Path | str] = {"base": base_dir}
        for i, ad in enumerate(ads):
            inputs["adapter" if i == 0 else f"adapter_{i + 1}"] = ad.path
        settings = {"weights": weights, "dtype": opts.dtype, "max_shard_size": str(opts.max_shard_size),
                    "template": tpl.name, "untied_embeddings": bool(p.untied), "vocab_size": p.vocab_size}  # fmt: skip
        if opts.modelfile:
            _write_modelfile(tmp, tpl, str(opts.base))
        for warning in hf_dir.finish(tmp, tpl, base_dir, stage="merge", inputs=inputs, settings=settings,
                                     strict=forced):  # fmt: skip
            _say(f"[yellow]warning[/]: {escape(warning)}")
    what = f"merged {len(ads)} adapter(s) into" if ads else f"wrote {base_dir} as"
    _say(f"{what} {out} ({n_shards} shard(s), template {tpl.name})")
    return MergeResult(out, n_shards, tpl.name, p.untied, p.vocab_size)
