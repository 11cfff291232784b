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
from pathlib import Path

from exporter.errors import UserError
from exporter.lf_args import ExportConfig, say
from exporter.merge import MergeOptions, MergeResult, merge
from exporter.quantize import Names, QuantizeOptions, QuantizeResult, check_model, check_options, quantize, require

# LF's infer_dtype -> exporter merge's --dtype ("auto": the base's own, float32 halved to bfloat16 as LF does)
_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# quantize's options as the export YAML names them (it has no method key: GPTQ, as in LF)
EXPORT_NAMES = Names(
    method="GPTQ", bits="export_quantization_bit", dataset="export_quantization_dataset",
    dataset_dir="dataset_dir", samples="export_quantization_nsamples", max_length="export_quantization_maxlen",
    max_shard_size="export_size", instead="remove export_quantization_bit to export the merged model, then run "
    "`exporter quantize` on it with --method {others}", builtin=False,
)  # fmt: skip


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
    if "export_legacy_format" in given and cfg.export_legacy_format:
        say("export_legacy_format: true: the export is safetensors, as LLaMA-Factory 0.9.5's on transformers 5 (it "
            "writes pickled .bin only on transformers 4); exporter never writes pickle")  # fmt: skip
    if "trust_remote_code" in given:
        say("trust_remote_code: the merge runs no model code (a remote-code model's *.py files are copied along)")
    if "resize_vocab" in given and cfg.resize_vocab:
        say("resize_vocab: exporter resizes nothing itself; the vocabulary size is that of the embeddings the adapter "
            "saved (LLaMA-Factory resizes the base to the tokenizer, then loads them: the same tensors), else the "
            "base's")  # fmt: skip


def _check_added_tokens(cfg: ExportConfig, adapters: list[str]) -> None:
    """`add_tokens` / `add_special_tokens` name the tokens training added: each must be in the tokenizer the export
    carries (the last adapter dir with one, else the base), where LF would add it and resize the embeddings with an
    untrained row; one line naming the missing token and that tokenizer."""
    from exporter import hf_dir, hub

    wanted = [t.strip() for key in (cfg.add_tokens, cfg.add_special_tokens) for t in (key or "").split(",")]
    if not (wanted := [t for t in wanted if t]):
        return
    src = hf_dir.tokenizer_source(hub.resolve(cfg.model_name_or_path, "model"),
                                  [hub.resolve(a, "adapter") for a in adapters])  # fmt: skip
    vocab = hf_dir.vocabulary(src) or {}
    if missing := [t for t in wanted if t not in vocab]:
        raise UserError(f"{missing[0]!r} (add_tokens / add_special_tokens) is not in the tokenizer of {src}: the "
                        "export carries the tokenizer training saved; point adapter_name_or_path at the training "
                        "output that added it")  # fmt: skip


def _merge_dtype(cfg: ExportConfig, base: str) -> str | None:
    if cfg.infer_dtype != "auto":
        return _DTYPES[cfg.infer_dtype]
    from exporter import hub
    from exporter.config import read_json

    config = read_json(hub.resolve(base, "model") / "config.json", optional=True)
    return "bf16" if str(config.get("dtype") or config.get("torch_dtype")) == "float32" else None


def _quantize_options(cfg: ExportConfig, out: Path) -> QuantizeOptions:
    """`exporter quantize --method gptq` with LF's export_quantization_* keys (the model is set once merged)."""
    return QuantizeOptions(model=cfg.model_name_or_path, method="gptq", out=str(out), bits=cfg.export_quantization_bit,
                           dataset=cfg.export_quantization_dataset, samples=cfg.export_quantization_nsamples,
                           max_length=cfg.export_quantization_maxlen, template=cfg.template,
                           max_shard_size=f"{cfg.export_size}GB")  # fmt: skip


def _check_quantize(q: QuantizeOptions, out: Path, adapters: list[str]) -> dict[str, Path | str]:
    """Every quantize check on the base (the merge keeps its config and layer shapes) before anything is merged, in
    LF's keys; returns the inputs the export's manifest records (the base and adapters, not the temporary merge)."""
    from exporter import atomic, hf_dir, hub

    bits, group = check_options(q, EXPORT_NAMES)
    require(q.method)
    base = hub.resolve(q.model, "model")
    inputs: dict[str, Path | str] = {"base": base}
    for i, a in enumerate(adapters):
        inputs["adapter" if i == 0 else f"adapter_{i + 1}"] = hub.resolve(a, "adapter")
    atomic.check_target(out, False, list(inputs.values()))
    adapter = Path(inputs["adapter"]) if adapters else None
    hf_dir.check_loadable(base, hf_dir.tokenizer_dir(base, adapter))  # what quantize loads, checked before the merge
    check_model(q, base, group, EXPORT_NAMES)
    return inputs


def export(cfg: ExportConfig, given: set[str] | None = None) -> ExportResult:
    """Merge (and quantize when asked) per LF's export keys; returns what was written to `export_dir`."""
    from exporter import atomic, gguf

    given = given if given is not None else set()
    out = Path(cfg.export_dir)
    if out.exists():
        raise UserError(f"export_dir {out} already exists; exporter never writes into an existing dir: remove it")
    adapters = [a.strip() for a in (cfg.adapter_name_or_path or "").split(",") if a.strip()]
    if adapters and cfg.finetuning_type != "lora":
        raise UserError(f"adapter_name_or_path with finetuning_type {cfg.finetuning_type}: only LoRA adapters merge")
    if cfg.cache_dir:  # LF's hub cache of its own: hub ids become their snapshot dirs there, before any other step
        from exporter import hub

        adapters = [str(hub.resolve(a, "adapter", cfg.cache_dir)) for a in adapters]
        cfg = dataclasses.replace(cfg, model_name_or_path=str(hub.resolve(cfg.model_name_or_path, "model",
                                  cfg.cache_dir)), adapter_name_or_path=",".join(adapters) or None)  # fmt: skip
    _check_added_tokens(cfg, adapters)
    merge_opts = MergeOptions(base=cfg.model_name_or_path, adapters=adapters, out=str(out),
                              dtype=_merge_dtype(cfg, cfg.model_name_or_path), max_shard_size=f"{cfg.export_size}GB",
                              template=cfg.template)  # fmt: skip
    if cfg.export_quantization_bit is None:  # no adapters: LF re-saves the model (dtype, shards, template)
        _notes(cfg, given)
        merged = merge(dataclasses.replace(merge_opts, modelfile=True), need_adapter=False)
        if (out / "Modelfile").is_file():
            say(f"Ollama imports it with: {gguf.create_command(gguf.default_ollama_name(out), out / 'Modelfile')}")
        return ExportResult(out, merged, None)
    qopts = _quantize_options(cfg, out)
    inputs = _check_quantize(qopts, out, adapters)
    _notes(cfg, given)
    say("no Ollama Modelfile with export_quantization_bit (LLaMA-Factory writes one): Ollama imports 16/32-bit "
        "safetensors, not GPTQ's packed weights; for Ollama, export without it and run `exporter gguf` on the "
        "result")  # fmt: skip
    merged = None
    with atomic.scratch_dir(out) as work:  # a killed run's merge is removed like its other temporaries
        if adapters:
            merged = merge(dataclasses.replace(merge_opts, out=str(work / "merged")))
            qopts = dataclasses.replace(qopts, model=str(merged.out))
        quantized = quantize(qopts, EXPORT_NAMES, inputs if adapters else None)
    return ExportResult(out, merged, quantized)
