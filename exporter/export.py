"""`exporter export`: LLaMA-Factory's merge/export YAML (`llamafactory-cli export cfg.yaml`), unchanged.

The recipe: read LF's keys (`lf_args.ExportConfig`), merge the adapters into the base exactly as `exporter merge`
does (`export_size` GB shards, `infer_dtype` as LF reads it); without adapters, re-save the model as LF does (the
same streaming copy: cast to `infer_dtype`, resharded at `export_size`, tokenizer with the template); and with
`export_quantization_bit` quantize exactly as `exporter quantize --method gptq` does (calibrated on
`export_quantization_dataset`: a file of raw `text` rows as in LF, or dataset names from data/dataset_info.json).
LF refuses adapters and quantization in one config; exporter merges into a temporary dir, quantizes that, and removes
it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from exporter.errors import UserError
from exporter.lf_args import ExportConfig, say
from exporter.merge import MergeOptions, MergeResult, merge
from exporter.quantize import QuantizeOptions, QuantizeResult, quantize

# LF's infer_dtype -> exporter merge's --dtype ("auto": the base's own, float32 halved to bfloat16 as LF does)
_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclasses.dataclass
class ExportResult:
    """What `export` wrote: the export dir, and the merge and quantize results that made it."""

    out: Path
    merged: MergeResult | None
    quantized: QuantizeResult | None


def _notes(cfg: ExportConfig, given: set[str]) -> None:
    """Say once which given keys change nothing here (LF's meaning is kept where there is one)."""
    if "export_device" in given and cfg.export_device == "auto":
        say("export_device=auto: the merge streams tensors on the CPU with little memory; quantization uses a GPU "
            "when there is one")  # fmt: skip
    if "trust_remote_code" in given:
        say("trust_remote_code: the merge runs no model code (a remote-code model's *.py files are copied along)")


def _merge_dtype(cfg: ExportConfig, base: str) -> str | None:
    if cfg.infer_dtype != "auto":
        return _DTYPES[cfg.infer_dtype]
    from exporter import hub
    from exporter.config import read_json

    config = read_json(hub.resolve(base, "model") / "config.json", optional=True)
    return "bf16" if str(config.get("dtype") or config.get("torch_dtype")) == "float32" else None


def export(cfg: ExportConfig, given: set[str] | None = None) -> ExportResult:
    """Merge (and quantize when asked) per LF's export keys; returns what was written to `export_dir`."""
    given = given if given is not None else set()
    out = Path(cfg.export_dir)
    if out.exists():
        raise UserError(f"export_dir {out} already exists; exporter never writes into an existing dir: remove it")
    adapters = [a.strip() for a in (cfg.adapter_name_or_path or "").split(",") if a.strip()]
    quantizing = cfg.export_quantization_bit is not None
    if adapters and cfg.finetuning_type != "lora":
        raise UserError(f"adapter_name_or_path with finetuning_type {cfg.finetuning_type}: only LoRA adapters merge")
    _notes(cfg, given)
    merged = quantized = None
    merge_out = out.with_name(f".{out.name}.merged-{os.getpid()}") if quantizing else out
    try:
        if adapters or not quantizing:  # no adapters: LF re-saves the model (dtype, shards, template)
            opts = MergeOptions(base=cfg.model_name_or_path, adapters=adapters, out=str(merge_out),
                                dtype=_merge_dtype(cfg, cfg.model_name_or_path),
                                max_shard_size=f"{cfg.export_size}GB", template=cfg.template)  # fmt: skip
            merged = merge(opts, need_adapter=False)
        if quantizing:
            source = merge_out if adapters else cfg.model_name_or_path
            qopts = QuantizeOptions(model=str(source), method="gptq", out=str(out), bits=cfg.export_quantization_bit,
                                    dataset=cfg.export_quantization_dataset,
                                    samples=cfg.export_quantization_nsamples,
                                    max_length=cfg.export_quantization_maxlen, template=cfg.template)  # fmt: skip
            quantized = quantize(qopts)
    finally:
        if quantizing and merge_out.exists():
            shutil.rmtree(merge_out)
    return ExportResult(out, merged, quantized)
