"""`exporter quantize`: GPTQ / AWQ (gptqmodel) and bitsandbytes nf4 / int8 checkpoints that plain transformers loads.

GPTQ and AWQ are calibrated on the user's data rendered through the model's chat template (`exporter.calibration`);
bitsandbytes quantizes at load time and needs no calibration. Every output dir is complete: weights with their
quantization config, the tokenizer with the chat template, `generation_config.json` whose `eos_token_id` holds the
end-of-turn tokens, and `exporter_manifest.json`; it is written atomically.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from exporter.config import read_json
from exporter.errors import UserError

METHODS = ("gptq", "awq", "bnb4", "bnb8")
# the calibration settings of gptq/awq when not given (QuantizeOptions' samples, max_length, seed)
CALIBRATION = {"samples": 128, "max_length": 512, "seed": 0}
BITS = {"gptq": (4, 8), "awq": (4,), "bnb4": (4,), "bnb8": (8,)}
# group sizes gptqmodel 7.6's kernels accept (TorchQuantLinear for GPTQ, AwqTorchQuantLinear for AWQ)
GROUP_SIZES = {"gptq": (-1, 16, 32, 64, 128, 256, 512, 1024), "awq": (-1, 16, 32, 64, 128)}
AWQ_OUT_MULTIPLE = 8  # AWQ packs 8 output columns into one int32
EXTRA_HINT = "pip install 'exporter[quant]'"
# (method, model_type) pairs gptqmodel 7.6.0 has a definition for but fails on (measured on the tiny fixtures)
BROKEN = {
    ("awq", "phi3"): "gptqmodel 7.6.0's AWQ builds no scaling groups for Phi-3's fused qkv_proj/gate_up_proj and "
    "then fails while packing (KeyError 'q_zeros')",
    ("gptq", "phi3"): "gptqmodel 7.6.0 writes a corrupt g_idx for Phi-3's fused gate_up_proj, so the output fails "
    "to load (IndexError in its TorchAtenLinear kernel)",
    **dict.fromkeys(
        (("gptq", "glm4"), ("awq", "glm4")),
        "gptqmodel 7.6.0 saves GLM-4's fused gate_up_proj as separate gate_proj/up_proj layers, which transformers' "
        "GLM-4 does not have: reloaded, gate_up_proj is missing (GPTQ fails with an IndexError, AWQ computes NaN)",
    ),
}
# why no method quantizes an MoE checkpoint (one with `.experts.` tensors) into a dir transformers reloads intact
MOE_BROKEN = {
    "gptq": "gptqmodel 7.6.0 saves one quantized layer per expert, which transformers 5's fused 3-D experts do not "
    "load (the experts would come back newly initialized)",
    "bnb4": "bitsandbytes quantizes linear layers only and transformers 5 holds MoE experts as fused 3-D "
    "parameters, so the experts (most of the weights) would stay 16-bit",
}
MOE_BROKEN |= {"awq": MOE_BROKEN["gptq"], "bnb8": MOE_BROKEN["bnb4"]}
_console = Console(stderr=True)


@dataclasses.dataclass
class QuantizeOptions:
    """What `exporter quantize` takes (CLI flags and the pipeline's `quantize:` block)."""

    model: str
    method: str
    out: str
    bits: int | None = None
    group_size: int | None = None
    dataset: str | None = None  # names from dataset_info.json, or a file of raw `text` rows (LLaMA-Factory's export)
    dataset_dir: str | None = None
    template: str | None = None
    # calibration (gptq/awq); None: CALIBRATION's value, and given with bitsandbytes, which calibrates nothing: refused
    samples: int | None = None
    max_length: int | None = None
    seed: int | None = None
    max_shard_size: str = "2GB"  # as `exporter merge --max-shard-size`
    force: bool = False


@dataclasses.dataclass(frozen=True)
class Names:
    """What the user calls each option in messages: `exporter quantize`'s flags (the defaults), or the keys of the
    command that quantizes on its behalf (`exporter export`'s `export_quantization_*`)."""

    method: str = "--method {method}"
    bits: str = "--bits"
    dataset: str = "--dataset"
    dataset_dir: str = "--dataset-dir"
    samples: str = "--samples"
    max_length: str = "--max-length"
    max_shard_size: str = "--max-shard-size"
    instead: str = "use {others}"  # what to do when the method cannot quantize the model
    builtin: bool = True  # without a dataset, the built-in texts calibrate


FLAGS = Names()


def check_options(o: QuantizeOptions, names: Names = FLAGS) -> tuple[int, int | None]:
    """Validate the flag combination; returns (bits, group_size) with defaults applied."""
    from exporter.config import did_you_mean
    from exporter.shards import parse_size

    if o.method not in METHODS:
        raise UserError(f"unknown --method {o.method!r}{did_you_mean(o.method, METHODS)}; choose one of {METHODS}")
    bits = o.bits if o.bits is not None else BITS[o.method][0]
    if bits not in BITS[o.method]:
        hint = {"awq": "; AWQ is 4-bit only: use --method gptq --bits 8 or bnb8 for 8 bits"}.get(o.method, "")
        method = names.method.format(method=o.method)
        raise UserError(f"{names.bits} {bits} is not supported by {method} (supported: {BITS[o.method]}){hint}")
    if parse_size(o.max_shard_size) <= 0:
        raise UserError(f"{names.max_shard_size} {o.max_shard_size!r}: must be positive")
    if o.method.startswith("bnb"):
        given = [f for f, v in (("--group-size", o.group_size), ("--dataset", o.dataset),
                                ("--dataset-dir", o.dataset_dir), (names.samples, o.samples),
                                (names.max_length, o.max_length), ("--seed", o.seed)) if v is not None]  # fmt: skip
        if given:
            raise UserError(
                f"{', '.join(given)} do nothing with --method {o.method}: bitsandbytes quantizes at load time "
                f"without calibration and with its fixed block size; drop them or use --method gptq/awq"
            )
        return bits, None
    group = o.group_size if o.group_size is not None else 128
    if group not in GROUP_SIZES[o.method]:
        raise UserError(
            f"--group-size {group} is not supported for {o.method} by gptqmodel's kernels; "
            f"use one of {GROUP_SIZES[o.method]} (-1 = one group per row)"
        )
    return bits, group


def with_defaults(o: QuantizeOptions) -> QuantizeOptions:
    """`o` with the calibration settings not given set to CALIBRATION's."""
    return dataclasses.replace(o, **{k: v for k, v in CALIBRATION.items() if getattr(o, k) is None})


def require(method: str) -> None:
    """The optional `[quant]` extra must be installed for this method."""
    needed = ["bitsandbytes"] if method.startswith("bnb") else ["gptqmodel", "optimum"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--method {method} needs {', '.join(missing)}, not installed: {EXTRA_HINT}")


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    return read_json(path)


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """`(out_features, in_features)` of every 2-D weight inside the decoder layers, from the safetensors headers."""
    from exporter.safetensors_file import read_header

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights (convert .bin checkpoints with save_pretrained)")
    shapes: dict[str, tuple[int, int]] = {}
    for f in files:
        for name, entry in read_header(f).items():
            if not name.endswith(".weight") or not re.search(r"\.layers\.\d+\.", name):
                continue
            if len(entry.shape) == 2:
                shapes[name[: -len(".weight")]] = (int(entry.shape[0]), int(entry.shape[1]))
    if not shapes:
        raise UserError(f"{model_dir}: found no linear layers under '*.layers.N.*' to quantize")
    return shapes


def check_shapes(shapes: dict[str, tuple[int, int]], method: str, group: int) -> None:
    """Every quantized layer's in_features must split into whole groups (AWQ: out_features into packs of 8)."""
    if method == "awq":
        for name, (out_f, _) in sorted(shapes.items()):
            if out_f % AWQ_OUT_MULTIPLE:
                raise UserError(
                    f"layer {name}: out_features {out_f} is not a multiple of {AWQ_OUT_MULTIPLE}, which AWQ packing "
                    f"needs; use --method gptq or bnb4 for this model"
                )
    if group <= 0:
        return
    for name, (_, in_f) in sorted(shapes.items()):
        if in_f % group:
            ok = [g for g in GROUP_SIZES[method] if g == -1 or all(i % g == 0 for _, i in shapes.values())]
            raise UserError(
                f"layer {name}: in_features {in_f} is not divisible by --group-size {group}; "
                f"group sizes that divide every layer of this model: {', '.join(map(str, ok))}"
            )


def _has_experts(model_dir: Path) -> bool:
    from exporter.safetensors_file import read_header

    return any(".experts." in n for f in sorted(model_dir.glob("*.safetensors")) for n in read_header(f))


def _check_architecture(cfg: dict[str, Any], method: str, model_dir: Path, names: Names = FLAGS) -> None:
    model_type = cfg.get("model_type")
    if not model_type:
        raise UserError(f"{model_dir / 'config.json'}: no model_type")
    said = names.method.format(method=method)
    if _has_experts(model_dir):
        raise UserError(
            f"{said} cannot quantize model_type {model_type!r} (MoE experts): {MOE_BROKEN[method]}; "
            "no method here quantizes MoE experts, `exporter gguf --type q4_k_m` does"
        )
    if (method, model_type) in BROKEN:
        others = " or ".join(m for m in METHODS if (m, model_type) not in BROKEN)
        raise UserError(
            f"{said} cannot quantize model_type {model_type!r}: {BROKEN[method, model_type]}; "
            f"{names.instead.format(others=others)}"
        )
    if method.startswith("bnb"):
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise UserError(f"model_type {model_type!r} ({model_dir}) is not known to this transformers version")
        return
    _import_gptqmodel()
    from gptqmodel.models.auto import MODEL_MAP

    if model_type not in MODEL_MAP:
        from exporter.config import did_you_mean

        raise UserError(
            f"model_type {model_type!r} ({model_dir / 'config.json'}) is not among the {len(MODEL_MAP)} architectures "
            f"gptqmodel supports{did_you_mean(model_type, MODEL_MAP)}, so {said} cannot quantize it; "
            f"{names.instead.format(others='bnb4 or bnb8')} (bitsandbytes works for any model transformers loads)"
        )


def _import_gptqmodel() -> Any:
    """Import gptqmodel with a CPU worker pool that works on small machines (its default of 1 fails on 2 cores), without
    its banner and INFO logs (its logger is set to INFO, and the banner logged, as it is imported)."""
    from exporter import quiet

    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, min(12, ((os.cpu_count() or 2) + 1) // 2)))
    with quiet.prints_dropped():
        import gptqmodel
    quiet.loggers_down()
    return gptqmodel


def _rotary_needs_layer_type(hf_model: Any) -> bool:
    """Whether the model's rotary embedding takes a required `layer_type` argument (per-layer-type RoPE)."""
    import inspect

    for name, mod in hf_model.named_modules():
        if name.endswith("rotary_emb"):
            p = inspect.signature(mod.forward).parameters.get("layer_type")
            return p is not None and p.default is inspect.Parameter.empty
    return False


def check_model(o: QuantizeOptions, model_dir: Path, group: int | None, names: Names = FLAGS) -> dict[str, Any]:
    """Everything knowable before quantizing `model_dir` (its config, layers and architecture, the calibration
    inputs); returns its config.json."""
    from exporter import calibration

    o = with_defaults(o)
    cfg = _read_config(model_dir)
    shapes = linear_shapes(model_dir)
    if group is not None:  # first: it needs no quantization library
        calibration.check_inputs(o.dataset, o.dataset_dir, o.samples, o.max_length, names)
    _check_architecture(cfg, o.method, model_dir, names)
    if group is not None:
        check_shapes(shapes, o.method, group)
    return cfg


def _run_gptqmodel(
    model_dir: Path, tmp: Path, method: str, bits: int, group: int, blocks: list[list[int]], shard_bytes: int
) -> str:
    """Quantize with gptqmodel and save into `tmp`; returns the kernel backend used."""
    import torch

    from exporter import quiet
    from exporter.progress import progress

    gm = _import_gptqmodel()
    cuda = torch.cuda.is_available()
    if method == "gptq":
        # one group per row (-1): gptqmodel's group-aware activation order needs groups, so it is off there
        extra = {"act_group_aware": False} if group == -1 else {}
        qc = gm.QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True, **extra)
        backend = gm.BACKEND.AUTO
    else:
        qc = gm.AWQConfig(bits=bits, group_size=group)
        # gptqmodel's default AWQ backend is a CUDA kernel ("AWQ: CUDA is not available" on CPU)
        backend = gm.BACKEND.AUTO if cuda else gm.BACKEND.TORCH
    calib = [{"input_ids": b, "attention_mask": [1] * len(b)} for b in blocks]
    from gptqmodel.looper import loop_processor

    with tempfile.TemporaryDirectory(prefix="exporter-gptqmodel-logs-") as logs:
        # gptqmodel 7.6 writes per-run logs into ./logs of the current directory; keep the user's cwd clean
        loop_processor._PROJECT_LOG_DIR = Path(logs)
        with quiet.prints_dropped():  # its own bars: one line per module and batch when not on a terminal
            model = gm.GPTQModel.load(str(model_dir), qc)
        if method == "awq" and _rotary_needs_layer_type(model.model):
            # gptqmodel 7.6's AWQ scale search recomputes RoPE without `layer_type` (Gemma 3: local/global RoPE) and
            # fails; reuse the position embeddings captured from the real forward pass instead.
            model.awq_preserve_explicit_position_embeddings = True
        layers = int(getattr(model.model.config.get_text_config(), "num_hidden_layers", 0) or 0)
        with progress(f"{method} layers", "", total=layers) as advance, quiet.prints_dropped():

            def layer_done(layer_idx: int, submodule_finalized: bool) -> None:
                if submodule_finalized and isinstance(layer_idx, int) and 0 <= layer_idx < layers:
                    advance()

            model.layer_callback = layer_done  # gptqmodel calls it as each layer is quantized and finalized
            model.quantize(calib, backend=backend, calibration_data_min_length=1, calibration_sort="desc")
        with quiet.prints_dropped():
            model.save(str(tmp), max_shard_size=shard_bytes)
    return str(getattr(backend, "value", backend))


def _run_bnb(model_dir: Path, tmp: Path, method: str, cfg: dict[str, Any], shard_bytes: int) -> str:
    """Quantize at load with bitsandbytes and `save_pretrained` into `tmp`; returns the device used."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    compute = getattr(torch, src_dtype) if src_dtype in ("float16", "bfloat16") else torch.bfloat16
    if method == "bnb4":
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )  # fmt: skip
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=qc, device_map=device, dtype=compute
    )
    model.save_pretrained(str(tmp), max_shard_size=shard_bytes)
    return device


def _check_quantization_config(tmp: Path) -> None:
    """The quantizer wrote a quantization_config, and no calibration text in it (transformers' GPTQConfig path
    stores its dataset there)."""
    cfg_path = tmp / "config.json"
    cfg = read_json(cfg_path)
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise RuntimeError(f"the quantizer wrote no quantization_config into {cfg_path}")
    if qcfg.pop("dataset", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclasses.dataclass
class QuantizeResult:
    """What `quantize` wrote."""

    out: Path
    method: str
    bits: int
    group_size: int | None  # None for bitsandbytes
    template: str
    seconds: float


def _calibrate(opts: QuantizeOptions, tokenizer: Any, tpl: Any, names: Names) -> Any:
    """Calibration blocks for GPTQ/AWQ from the dataset (or the built-in texts), with what was found said."""
    from rich.markup import escape

    from exporter import calibration

    text = calibration.text_file(opts.dataset)
    how = f"raw text rows of {text}, tokenized as plain text" if text else f"rendering through template {tpl.name!r}"
    _console.print(f"[bold]calibration[/]: {escape(how)}")
    cal = calibration.build(tokenizer, tpl, opts.dataset, opts.dataset_dir, opts.samples, opts.max_length, opts.seed,
                            names)  # fmt: skip
    if len(cal.blocks) < opts.samples:
        _console.print(
            f"[yellow]calibration[/]: {escape(cal.source)} gives {len(cal.blocks)} blocks of up to {opts.max_length} "
            f"tokens ({cal.tokens} tokens), fewer than {names.samples} {opts.samples}; using all of them"
        )
    if cal.rejected:
        _console.print(f"[yellow]calibration[/]: rows left out: {dict(cal.rejected)}")
    return cal


def quantize(
    opts: QuantizeOptions, names: Names = FLAGS, inputs: dict[str, Path | str] | None = None
) -> QuantizeResult:
    """Quantize the HF model `opts.model` with `opts.method` into `opts.out`. `names`: what the options are called in
    messages; `inputs`: what the manifest records as made from (default: the model; `export` names the base and
    adapters its temporary merge came from)."""
    import torch

    from exporter import atomic, calibration, hf_dir, hub, manifest, templates
    from exporter.shards import parse_size

    bits, group = check_options(opts, names)
    opts = with_defaults(opts)
    require(opts.method)
    model_dir = hub.resolve(opts.model, "model")
    out = Path(opts.out)
    atomic.check_target(out, opts.force, [model_dir])
    manifest.check_stage(out, "quantize")  # --force replaces a previous quantize output only
    hf_dir.check_loadable(model_dir, tokenizer=False)  # architecture, pickled weights: one line, no dir code run
    tokenizer = hf_dir.load_tokenizer(model_dir, sentencepiece_prefix=True)  # loaded once; one line if it cannot
    cfg = check_model(opts, model_dir, group, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.check_free_space(out.parent, sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) // 2)
    from exporter.converters.gguf_convert import check_finite

    check_finite(model_dir)  # quantizers would carry inf/nan into the output without a word

    tpl = templates.resolve(model_dir, opts.template, need=False)
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    settings: dict[str, Any] = {"method": opts.method, "bits": bits, "template": tpl.name, "seed": opts.seed,
                                "max_shard_size": str(opts.max_shard_size)}  # fmt: skip
    inputs = dict(inputs) if inputs else {"model": model_dir}
    cal = _calibrate(opts, tokenizer, tpl, names) if group is not None else None
    if cal is not None:
        settings.update(group_size=group, samples=opts.samples, max_length=opts.max_length,
                        calibration=cal.describe())  # fmt: skip
        if opts.dataset:
            inputs["dataset"] = calibration.dataset_source(opts.dataset, opts.dataset_dir)
    shard_bytes = parse_size(opts.max_shard_size)
    start = time.perf_counter()
    with atomic.atomic_dir(out, opts.force, [model_dir]) as tmp:
        _console.print(f"[bold]quantize[/]: {opts.method} {bits}-bit {model_dir} -> {out}")
        if cal is not None:
            settings["backend"] = _run_gptqmodel(model_dir, tmp, opts.method, bits, group, cal.blocks, shard_bytes)
        else:
            settings["device"] = _run_bnb(model_dir, tmp, opts.method, cfg, shard_bytes)
        _check_quantization_config(tmp)
        settings["seconds"] = round(time.perf_counter() - start, 2)
        from rich.markup import escape

        forced = opts.template not in (None, "auto")  # only a template the user asked for must fit the tokenizer
        for warning in hf_dir.finish(tmp, tpl, model_dir, tokenizer_dir=model_dir, stage="quantize", inputs=inputs,
                                     settings=settings, strict=forced):  # fmt: skip
            _console.print(f"[yellow]warning[/]: {escape(warning)}")
    _console.print(f"[green]done[/]: {out} ({settings['seconds']} s)")
    return QuantizeResult(out, opts.method, bits, group, tpl.name, settings["seconds"])
