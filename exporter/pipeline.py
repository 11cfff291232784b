"""exporter pipeline: train -> merge -> gguf -> verify from one YAML file into one run dir, resumable by stage.

    base: path/or/hub-id          # the model to fine-tune
    run_dir: runs/my-run          # every stage writes below it: adapter/ merged/ gguf/ verify/ pipeline.json
                                  # (a full or freeze run: model/ gguf/ verify/; nothing to merge)
    template: qwen-2.5            # chat-template family (default: detected from the base model)
    train: {dataset: identity, dataset_dir: data/demo, max_steps: 60, ...}   # `exporter train` keys
    merge: {dtype: bfloat16}      # `exporter merge` options
    gguf: {types: [f16, q8_0, q4_k_m], ollama_name: my-model}
    verify: {prompts: 4, ppl_threshold: {q4_k_m: 0.05}}                       # `exporter verify` options

Each block is the options of that stage (`TrainConfig`, `MergeOptions`, `GGUFOptions`, `VerifyOptions`) less the
keys the pipeline sets itself (model, input and output paths, template). `key=value` overrides use dotted keys
(`train.max_steps=5`, `gguf.types=f16`). A stage is finished when its output is complete (each stage writes
atomically) and `pipeline.json` records the same config hash for it; a finished stage is skipped on a rerun only
while its files still match its manifest's sha256 (a changed or truncated file reruns it). The hash of a stage
covers its own settings and the hash of the stage before, so a change re-runs that stage and everything after it.
Every stage's settings are checked (keys, types and values) before the first stage runs; one pipeline at a time
writes a run dir, which must be new, empty, or hold `pipeline.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import config, manifest
from exporter.atomic import atomic_dir, atomic_file, claim
from exporter.errors import UserError

if TYPE_CHECKING:
    from exporter.gguf import GGUFOptions
    from exporter.lf_args import TrainConfig
    from exporter.merge import MergeOptions
    from exporter.verify import VerifyOptions

STAGES = ("train", "merge", "gguf", "verify")
STATE = "pipeline.json"
# keys of each stage's options that the pipeline sets itself (from base, run_dir, template and the stage before)
_SET_BY_PIPELINE = {
    "train": {"model_name_or_path", "output_dir", "template"},
    "merge": {"base", "adapters", "out", "template", "force"},
    "gguf": {"model", "out", "template", "adapter", "base_gguf", "force"},
    "verify": {"base", "adapter", "merged", "ggufs", "modelfiles", "quantized", "run_dir", "template", "data"},
}


@dataclasses.dataclass
class PipelineConfig:
    """The pipeline YAML: the base model, the run dir, the template and one settings block per stage."""

    base: str
    run_dir: str = "runs/pipeline"
    template: str | None = None
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    merge: dict[str, Any] = dataclasses.field(default_factory=dict)
    gguf: dict[str, Any] = dataclasses.field(default_factory=lambda: {"types": ["f16"]})
    verify: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineResult:
    """Where things are, which stages ran or were skipped, and the verify verdict."""

    run_dir: Path
    ran: list[str]
    skipped: list[str]
    passed: bool
    report: Path
    commands: list[str]
    answers: list[dict[str, Any]]


def load_config(path: Path | str, overrides: list[str]) -> PipelineConfig:
    """Config from YAML plus dotted `key=value` overrides; unknown keys are errors (with did-you-mean)."""
    data = config.read_yaml(path)
    for key, value in config.parse_overrides(overrides).items():
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key}: {p} is not a mapping in {path}")
        node[parts[-1]] = value
    where = f"{path} with {' '.join(overrides)}" if overrides else str(path)  # a bad key may be an override's
    cfg = config.build(PipelineConfig, data, where=where)
    with contextlib.redirect_stderr(io.StringIO()):  # its notes are said once, when `run` builds the options again
        check(stage_options(cfg, Path(cfg.base), where=where))  # every block's keys, types, values before any runs
    return cfg


@dataclasses.dataclass
class StageOptions:
    """The options each stage runs with, built from the pipeline config."""

    train: TrainConfig
    train_given: set[str]  # the train keys set (for train's notes on keys without effect)
    merge: MergeOptions
    gguf: GGUFOptions
    verify: VerifyOptions  # ggufs/modelfiles are filled in when verify runs


def _build(cls: type, name: str, block: dict[str, Any], fixed: dict[str, Any], where: str) -> Any:
    for key in block:
        if key in _SET_BY_PIPELINE[name]:
            raise UserError(f"{where}: {name}.{key} is set by the pipeline (base / run_dir / template); remove it")
    if name == "train":  # read as `exporter train` reads a YAML (LF's `eval_steps` without eval_strategy, `no`...)
        from exporter import lf_args

        return lf_args.config_from_dict({**block, **fixed}, where=f"{where}: {name}")[0]
    return config.build(cls, {**block, **fixed}, where=f"{where}: {name}")


def trained_dir(run_dir: Path, train_block: dict[str, Any]) -> Path:
    """Where the train stage writes: `adapter/` for LoRA (merged next), `model/` for a full or freeze run (the model
    itself, converted as it is: nothing to merge)."""
    return run_dir / ("adapter" if train_block.get("finetuning_type", "lora") == "lora" else "model")


def stage_options(cfg: PipelineConfig, base: Path, where: str = "pipeline") -> StageOptions:
    """Each stage's options: the user's block plus what the pipeline sets (paths in run_dir, the template)."""
    from exporter import gguf, lf_args, merge, verify

    run_dir, tpl = Path(cfg.run_dir), cfg.template
    adapter = trained_dir(run_dir, cfg.train)
    lora = adapter.name == "adapter"
    merged = run_dir / "merged" if lora else adapter
    fixed = {"model_name_or_path": str(base), "output_dir": str(adapter), "template": tpl}
    train_opts = _build(lf_args.TrainConfig, "train", cfg.train, fixed, where)
    data_files = _data_files(train_opts)
    merge_opts = _build(merge.MergeOptions, "merge", cfg.merge,
                        {"base": str(base), "adapters": [str(adapter)], "out": str(merged), "template": tpl,
                         "force": True}, where)  # fmt: skip
    gguf_opts = _build(
        gguf.GGUFOptions,
        "gguf",
        cfg.gguf,
        {"model": str(merged), "out": str(run_dir / "gguf"), "template": tpl, "force": True},
        where,
    )
    block = dict(cfg.verify)
    for key in verify.LIMITS:  # ppl_threshold, kld_threshold, top1_threshold: "f16=0.001,..." or a mapping
        if isinstance(block.get(key), str):
            block[key] = verify.parse_thresholds(block[key], key)
    verify_opts = _build(verify.VerifyOptions, "verify", block,
                         {"base": base if lora else None, "adapter": adapter if lora else None, "merged": merged,
                          "template": tpl, "data": data_files}, where)  # fmt: skip
    return StageOptions(train_opts, set(cfg.train) | {"model_name_or_path", "output_dir", "template"}, merge_opts,
                        gguf_opts, verify_opts)  # fmt: skip


def check(opts: StageOptions) -> None:
    """The values of every stage's options (a `gguf.types: q9` or a negative learning rate fails now, not after
    training)."""
    import torch

    from exporter import gguf, lf_args, merge, verify

    lf_args.check(opts.train, opts.train_given, "cuda" if torch.cuda.is_available() else "cpu", notes=False)
    merge.check_options(opts.merge)
    gguf.check_options(opts.gguf)
    v = opts.verify
    verify.limits_of(v)
    for key, least in (("prompts", 0), ("ctx", 8), ("max_windows", 1), ("max_new_tokens", 1)):
        if getattr(v, key) < least:
            raise UserError(f"verify.{key} must be at least {least}, got {getattr(v, key)}")
    if v.text is not None and not Path(v.text).is_file():
        raise UserError(f"verify.text {v.text}: no such file")


def _check_run_dir(run_dir: Path, opts: StageOptions) -> None:
    """A run dir is ours: absent, empty, or holding the pipeline's state file; and no stage's output is, lies in or
    holds an input (the base model, the training data, verify's text), as `atomic.check_target` refuses for one
    stage, before any stage runs."""
    from exporter import atomic

    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir} is a file")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / STATE).is_file():
        raise UserError(
            f"run_dir {run_dir} is not empty and holds no {STATE}: not a pipeline run dir; choose a new or empty one"
        )
    inputs = {f"the base model {opts.merge.base}": opts.merge.base}
    inputs |= {f"the training data file {p}": p for p in opts.verify.data}
    if opts.verify.text is not None:
        inputs[f"verify.text {opts.verify.text}"] = opts.verify.text
    outputs = {"train": opts.train.output_dir, "merge": opts.merge.out, "gguf": opts.gguf.out,
               "verify": run_dir / "verify"}  # fmt: skip
    for stage, out in outputs.items():
        for said, inp in inputs.items():
            if atomic.overlapping(out, [inp]) is not None:
                raise UserError(
                    f"run_dir {run_dir}: {stage} would write {out}, which overlaps {said}; choose a run_dir "
                    "outside the inputs"
                )


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(path: Path) -> list[Any]:
    """Names, sizes and mtimes of the files under `path` (cheap: a changed input changes this)."""
    if not path.exists():
        return [str(path)]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]  # fmt: skip


def _data_files(tcfg: Any) -> list[Path]:
    """The local dataset files the train stage reads (from dataset_info.json, inside dataset_dir), for hashing and
    for verify."""
    from exporter import dataset_info

    info = dataset_info.read_info(Path(tcfg.dataset_dir))
    specs = [dataset_info.spec(n, info, Path(tcfg.dataset_dir)) for n in tcfg.dataset]
    return [Path(sp.source) for sp in specs if sp.load_from == "file" and Path(sp.source).exists()]


class _State:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE
        self.doc: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            try:
                self.doc = config.read_json(self.path)
            except UserError as e:
                raise UserError(f"{e}; delete it to start the run over") from None

    def done(self, stage: str, h: str) -> bool:
        return self.doc["stages"].get(stage, {}).get("hash") == h

    def record(self, stage: str, h: str | None, seconds: float = 0.0, **extra: Any) -> None:
        if h is None:
            self.doc["stages"].pop(stage, None)
        else:
            self.doc["stages"][stage] = {"hash": h, "seconds": round(seconds, 1), **extra}
        self.save()

    def save(self) -> None:
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n", encoding="utf-8")


def run(cfg: PipelineConfig) -> PipelineResult:
    """Run the stages that are not finished (or whose config changed), then print where everything is."""
    from rich.console import Console

    from exporter import hub, templates

    console = Console()
    run_dir = Path(cfg.run_dir)
    base = hub.resolve(cfg.base, "base model")
    tpl = templates.resolve(base, cfg.template)
    opts = stage_options(cfg, base)  # no template given: every stage keeps the model's own (resolved the same way)
    check(opts)
    _check_run_dir(run_dir, opts)
    with claim(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        return _run(cfg, opts, console, run_dir, base, tpl.name)


def _run(cfg: PipelineConfig, opts: StageOptions, console: Any, run_dir: Path, base: Path,
         template: str) -> PipelineResult:  # fmt: skip
    state = _State(run_dir)
    data_files = opts.verify.data
    state.doc.update({"base": str(base.resolve()), "template": template,
                      "data": [str(p.resolve()) for p in data_files]})  # fmt: skip
    adapter, merged = Path(opts.train.output_dir), Path(opts.gguf.model)
    gguf_dir, verify_dir = run_dir / "gguf", run_dir / "verify"

    h_train = _hash("train", str(base.resolve()), _fingerprint(base), template, cfg.train,
                    [_fingerprint(p) for p in data_files])  # fmt: skip
    h_merge = _hash("merge", h_train, cfg.merge)
    h_gguf = _hash("gguf", h_merge, cfg.gguf)
    h_verify = _hash("verify", h_gguf, cfg.verify, _fingerprint(opts.verify.text) if opts.verify.text else 0)
    outputs = {"train": adapter, "merge": merged, "gguf": gguf_dir, "verify": verify_dir}
    hashes = {"train": h_train, "merge": h_merge, "gguf": h_gguf, "verify": h_verify}
    ran, skipped = [], []
    invalid = False
    for stage in STAGES:
        if stage == "merge" and merged == adapter:
            console.print(f"[dim]merge: nothing to merge (finetuning_type {opts.train.finetuning_type}): {adapter} is "
                          "converted as it is[/]")  # fmt: skip
            continue
        if state.done(stage, hashes[stage]) and not invalid:
            problem = manifest.changed(outputs[stage])  # what is reused must be what the stage wrote
            if problem is None:
                skipped.append(stage)
                console.print(f"[dim]{stage}: finished earlier (config hash {hashes[stage]}), skipped[/]")
                continue
            console.print(f"[yellow]{stage}[/]: {problem}; running {stage} again")
        invalid = True  # every later stage runs again too
        console.rule(f"[bold]{stage}")
        t0 = time.perf_counter()
        finished_before = state.doc["stages"].get(stage, {}).get("hash") is not None  # other settings or changed
        state.record(stage, None)
        _run_stage(stage, opts, overwrite=finished_before, verify_dir=verify_dir)
        state.record(stage, hashes[stage], time.perf_counter() - t0)
        ran.append(stage)
    return _summary(console, run_dir, ran, skipped, opts, verify_dir)


def _run_stage(stage: str, opts: StageOptions, overwrite: bool, verify_dir: Path) -> None:
    """One stage with its options; train starts over when it finished before (other settings, or its files changed)
    or a finished run is there."""
    from exporter import gguf, merge, train, verify
    from exporter.verify import report as verify_report

    if stage == "train":
        tcfg = opts.train
        finished = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
        if overwrite or any((Path(tcfg.output_dir) / n).exists() for n in finished):
            tcfg = dataclasses.replace(tcfg, overwrite_output_dir=True)
        train.train(tcfg, given=opts.train_given | ({"overwrite_output_dir"} if tcfg.overwrite_output_dir else set()))
    elif stage == "merge":
        merge.merge(opts.merge)
    elif stage == "gguf":
        gguf.run(opts.gguf)
    else:
        gguf_dir = Path(opts.gguf.out)
        vopts = dataclasses.replace(opts.verify, ggufs=sorted(gguf_dir.glob("*.gguf")),
                                    modelfiles=sorted(gguf_dir.glob("Modelfile*")))  # fmt: skip
        rep = verify.verify(vopts)
        verify_report.print_table(rep)
        with atomic_dir(verify_dir, force=True) as tmp:
            verify_report.write_json(rep, tmp / "report.json")
            verify_report.write_junit(rep, tmp / "junit.xml")
            manifest.write(tmp, "verify", inputs={}, settings={"passed": rep.passed})  # what was checked: report.json


def _summary(console: Any, run_dir: Path, ran: list[str], skipped: list[str], opts: StageOptions,
             verify_dir: Path) -> PipelineResult:  # fmt: skip
    from exporter import gguf

    gguf_opts = opts.gguf
    report = verify_dir / "report.json"
    doc = config.read_json(report)
    names = gguf.ollama_names(Path(gguf_opts.model), gguf.parse_types(gguf_opts.types), gguf_opts.ollama_name)
    gguf_dir = Path(gguf_opts.out)
    commands = [f"ollama create {name} -f {(gguf_dir / f'Modelfile.{kind}').resolve()}" for kind, name in names.items()]
    answers: list[dict[str, Any]] = []
    for c in doc["checks"]:
        if c["check"] == "chat" and c["metrics"].get("answers"):
            for a in c["metrics"]["answers"]:
                answers.append({"file": c["target"], **a})
    console.rule("[bold]result")
    if answers:
        first = answers[0]["prompt"]
        console.print(f"[bold]{first}[/]")
        console.print(f"  HF (merged):      {answers[0]['hf']!r}")
        for a in answers:
            if a["prompt"] == first:
                same = "same tokens" if a["first_divergence"] is None else f"differs from token {a['first_divergence']}"
                console.print(f"  GGUF {a['file']}: {a['gguf']!r} ({same})")
    verdict = "[bold green]PASSED[/]" if doc["passed"] else "[bold red]FAILED[/]"
    s = doc["summary"]
    warned = f", {s['warn']} with stated differences" if s.get("warn") else ""
    console.print(f"verify {verdict}: {s['pass']} passed, {s['fail']} failed, {s['skip']} skipped{warned} -> {report}")
    console.print(f"run dir: {run_dir.resolve()}  (ran: {', '.join(ran) or 'nothing'}; "
                  f"skipped: {', '.join(skipped) or 'nothing'})")  # fmt: skip
    for path in dict.fromkeys((Path(opts.train.output_dir), Path(gguf_opts.model), Path(gguf_opts.out))):
        console.print(f"  {path.name + '/':9} {path.resolve()}")
    console.print("Import into Ollama:")
    for cmd in commands:
        console.print(f"  {cmd}", soft_wrap=True)
    return PipelineResult(run_dir, ran, skipped, bool(doc["passed"]), report, commands, answers)
