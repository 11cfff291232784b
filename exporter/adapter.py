"""A PEFT LoRA adapter read for merging or conversion: its config checked, every tensor classified (LoRA A/B,
embedding LoRA, DoRA magnitude, lora bias, parameter LoRA on MoE experts, whole saved modules) or rejected, with each
module's scale from PEFT's formulas (alpha/r, rsLoRA alpha/sqrt(r), `rank_pattern`/`alpha_pattern`). Big tensors
stay on disk, read by rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.config import read_json
from exporter.errors import UserError
from exporter.hf_dir import has_tokenizer, vocabulary
from exporter.shards import read_header, read_rows

_PREFIXES = ("base_model.model.",)
_UNSUPPORTED = (
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_qalora",
    "layer_replication",
    "trainable_token_indices",
)
# transformers 5 holds an MoE layer's experts as 3-D parameters of its `experts` module, defined in this order. PEFT's
# `target_parameters` wraps each targeted one in a ParamWrapper, nesting them in that order: the first-defined is
# innermost, so its keys carry the most ".base_layer" (`experts.base_layer.lora_A` is gate_up when both are targeted)
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# transformers 5 module names -> the released checkpoints' names for the same tensors
_CHECKPOINT_RENAMES = ((".mlp.gate.", ".block_sparse_moe.gate."), (".mlp.experts.", ".block_sparse_moe.experts."))
# a fused expert parameter -> the per-expert checkpoint tensors stacked on its out axis (each: its possible names)
_EXPERT_PARTS = {"gate_up_proj": (("gate_proj", "w1"), ("up_proj", "w3")), "down_proj": (("down_proj", "w2"),)}


@dataclass
class Source:
    """A whole tensor an adapter carries (modules_to_save, a saved resized embedding): read lazily by rows."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: Callable[[int, int], torch.Tensor]


def _pow2(x: float) -> bool:
    m, _ = math.frexp(x)
    return x > 0 and m == 0.5


@dataclass
class LoraPart:
    """One adapted module of one adapter, with everything needed to compute its delta."""

    module: str
    A: torch.Tensor  # linear: (r, in); embedding: lora_embedding_A (r, vocab)
    B: torch.Tensor  # linear: (out, r); embedding: lora_embedding_B (hidden, r)
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    init: str | None = None  # a base-changing init_lora_weights (pissa, pissa_niter_N, olora): see `residual`
    init_scale: float = 1.0  # the adapter's own alpha/r (rsLoRA alpha/sqrt(r)), which PEFT's init uses

    def whole(self) -> bool:
        """DoRA norms over columns of the stored matrix, and a PiSSA/OLoRA residual, need every row at once."""
        return self.init is not None or (self.magnitude is not None and (self.embedding or self.fan_in_fan_out))

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """The weight PEFT leaves in the base layer when it creates (or loads) an adapter whose init_lora_weights is
        PiSSA or OLoRA: `w` minus its top-r part (SVD, randomized SVD for `pissa_niter_N`, QR for OLoRA), the same
        float32 arithmetic as PEFT's `pissa_init` / `olora_init`; the trained A and B apply to that residual."""
        r, s = self.A.shape[0], self.init_scale
        if self.init == "olora":
            q, rr = torch.linalg.qr(w)
            return w - s * q[:, :r].contiguous() @ rr[:r].contiguous()
        wt = w.T if self.fan_in_fan_out else w
        if self.init == "pissa":
            v, sv, uh = torch.linalg.svd(wt, full_matrices=False)
            vr, sr, uhr = v[:, :r], sv[:r] / s, uh[:r]
        else:
            with torch.random.fork_rng(devices=[]):  # a fixed draw: the same merge from the same files, every run
                torch.manual_seed(0)
                vr, sr, ur = torch.svd_lowrank(wt, r, niter=int(str(self.init).split("_niter_")[-1]))
            sr, uhr = sr / s, ur.t()
        a0, b0 = torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))
        res = wt - s * b0 @ a0
        return res.T if self.fan_in_fan_out else res

    def delta(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the delta in the stored layout, PEFT's `transpose(B @ A, fifo) * scale`."""
        if self.embedding or self.fan_in_fan_out:
            return (self.B @ self.A[:, r0:r1]).T.mul_(self.scale)
        return (self.B[r0:r1] @ self.A).mul_(self.scale)

    def apply(self, cur: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """`cur` (float32 rows r0:r1, updated in place when possible) with this module's change applied."""
        if self.init is not None:
            cur = self.residual(cur)
        if self.magnitude is None and not (self.embedding or self.fan_in_fan_out) and _pow2(self.scale):
            # one fused pass; scaling by a power of two is exact, so this rounds exactly like PEFT's
            # `W + (B @ A) * scale` (the common alpha = r or 2r); other scales take the three-pass path below
            return cur.addmm_(self.B[r0:r1], self.A, alpha=self.scale)
        merged = cur.add_(self.delta(r0, r1))
        if self.magnitude is None:
            return merged
        if self.embedding or self.fan_in_fan_out:  # norm per column of the stored matrix
            norm = torch.linalg.norm(merged.T, dim=1)
            return (self.magnitude / norm).view(1, -1) * merged
        norm = torch.linalg.norm(merged, dim=1)
        return (self.magnitude[r0:r1] / norm).view(-1, 1) * merged


@dataclass
class ExpertLora:
    """PEFT parameter LoRA on one fused expert tensor (experts, out, in): expert e changes by B_e @ A_e * scale, with
    A_e rows e*r..(e+1)*r of A (experts*r, in) and B_e columns e, e+experts, ... of B (out, experts*r), as PEFT's
    `ParamWrapper.get_delta_weight` reshapes them."""

    module: str  # the experts module, e.g. model.layers.0.mlp.experts
    param: str  # one of EXPERT_PARAMS
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    experts: int

    def part(self, e: int, r0: int, r1: int) -> LoraPart:
        """Rows r0:r1 of expert e's change as an ordinary LoRA of a 2-D tensor."""
        r = self.A.shape[0] // self.experts
        b = self.B[r0:r1, e :: self.experts].contiguous()
        return LoraPart(f"{self.module}.{e}.{self.param}", self.A[e * r : (e + 1) * r], b, self.scale)

    def whole(self) -> bool:
        return False

    def apply(self, cur: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Experts r0:r1 of the fused tensor (float32, shape (r1-r0, out, in)), changed in place."""
        out = self.B.shape[0]
        for i, e in enumerate(range(r0, r1)):
            cur[i] = self.part(e, 0, out).apply(cur[i], 0, out)
        return cur


@dataclass
class Adapter:
    path: Path
    label: str
    weight: float
    config: dict
    lora: dict[str, LoraPart] = field(default_factory=dict)  # module path -> part
    full: dict[str, Source] = field(default_factory=dict)  # tensor name (model-relative) -> whole tensor
    experts: dict[str, ExpertLora] = field(default_factory=dict)  # "<experts module>.<param>" -> parameter LoRA
    has_tokenizer: bool = False
    init: str | None = None  # a base-changing init_lora_weights (`base_changing_init`)


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


_LORA_AB = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.(?P<p>weight|bias)$")
_LORA_EMB = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_LORA_MAG = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_SAVED = re.compile(r"^(?P<mod>.+)\.modules_to_save\.(?:default\.)?(?P<p>.+)$")
_ORIGINAL = re.compile(r"^.+\.original_module\..+$")
_BASE_LAYER = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<p>weight|bias)$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (`get_pattern_key`): first key matching the module's name tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _adapter_tensors(path: Path) -> tuple[Path, dict[str, Source], dict[str, torch.Tensor]]:
    """Open adapter weights: small tensors loaded, every tensor available as a lazy Source."""
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    sources: dict[str, Source] = {}
    if st.exists():
        infos = read_header(st)
        for name, info in infos.items():
            sources[name] = Source(info.shape, info.dtype, lambda r0, r1, i=info: read_rows(i, r0, r1))
        return st, sources, {}
    if binf.exists():
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"{binf}: cannot load adapter weights ({type(e).__name__}: {e})") from None
        for name, t in sd.items():
            sources[name] = Source(tuple(t.shape), t.dtype, lambda r0, r1, t=t: t[r0:r1] if t.dim() else t)
        return binf, sources, sd
    raise UserError(f"adapter {path}: no adapter_model.safetensors or adapter_model.bin")


def _whole(src: Source) -> torch.Tensor:
    return src.rows(0, src.shape[0] if src.shape else 1).to(torch.float32)


def check_lora_numbers(cfg: dict, cfg_path: Path) -> None:
    """`r` / `rank_pattern` positive integers, `lora_alpha` / `alpha_pattern` finite numbers (PEFT's types)."""
    ranks = [("r", cfg.get("r", 8))] + [(f"rank_pattern.{k}", v) for k, v in (cfg.get("rank_pattern") or {}).items()]
    for key, v in ranks:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UserError(f"{cfg_path}: {key} is {v!r}; expected a positive integer (the LoRA rank)")
    alphas = [("lora_alpha", cfg.get("lora_alpha", 8))]
    alphas += [(f"alpha_pattern.{k}", v) for k, v in (cfg.get("alpha_pattern") or {}).items()]
    for key, v in alphas:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{cfg_path}: {key} is {v!r}; expected a finite number (the LoRA scale's numerator)")


def base_changing_init(cfg: dict, cfg_path: Path) -> str | None:
    """adapter_config.json's init_lora_weights when PEFT changes the base weights for it on every load (PiSSA's
    `pissa` / `pissa_niter_N`, `olora`): the trained A and B apply to that residual, which the merge recomputes as
    PEFT does. CorDA and LoftQ residuals need data or a quantizer PEFT ran at training: refused."""
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, str):
        return None
    if init == "pissa" or re.fullmatch(r"pissa_niter_\d+", init) or init.lower() == "olora":
        return "olora" if init.lower() == "olora" else init
    if init.startswith("pissa"):  # PEFT refuses these too
        raise UserError(f"{cfg_path}: init_lora_weights={init!r}: expected 'pissa' or 'pissa_niter_<iterations>'")
    if init.startswith(("corda", "loftq")):
        raise UserError(
            f"{cfg_path}: init_lora_weights={init!r} trained on a changed base that cannot be rebuilt here; convert "
            "it to a plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) "
            "(CorDA), or merge into the base LoftQ saved"
        )
    return None


def load_adapter(path: Path, weight: float, label: str) -> Adapter:
    """Read adapter_config.json and the adapter's tensors; every key is classified or rejected."""
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"adapter {path}: missing adapter_config.json (is this a PEFT adapter directory?)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object (PEFT's adapter config)")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise UserError(f"{cfg_path}: {key} is set; merging such adapters is not supported")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{cfg_path}: bias={cfg['bias']!r} adapters are not supported (only bias='none')")
    check_lora_numbers(cfg, cfg_path)
    init = base_changing_init(cfg, cfg_path)
    if init is not None and weight != 1.0:
        raise UserError(f"adapter {label}: init_lora_weights={init!r} trains on the base minus its top-r part; it "
                        "can only be merged with weight 1")  # fmt: skip
    file, sources, _ = _adapter_tensors(path)
    ad = Adapter(path, label, weight, cfg, init=init)
    ad.has_tokenizer = has_tokenizer(path)

    parts: dict[str, dict[str, Source]] = {}
    for raw, src in sources.items():
        key = _strip(raw)
        if m := _LORA_AB.match(key):
            parts.setdefault(m["mod"], {})[f"{m['ab']}.{m['p']}"] = src
        elif m := _LORA_EMB.match(key):
            parts.setdefault(m["mod"], {})[f"emb{m['ab']}"] = src
        elif m := _LORA_MAG.match(key):
            parts.setdefault(m["mod"], {})["mag"] = src
        elif m := _SAVED.match(key):
            ad.full.setdefault(f"{m['mod']}.{m['p']}", src)  # PEFT may also save it under its plain name
        elif _ORIGINAL.match(key):
            continue  # the base's own copy of a saved module
        elif m := _BASE_LAYER.match(key):
            ad.full[f"{m['mod']}.{m['p']}"] = src
        elif "lora_" in key or "trainable_tokens" in key:
            raise UserError(f"{file}: tensor {raw} is of a kind this merge does not know")
        else:
            ad.full.setdefault(key, src)

    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for mod, p in parts.items():
        bare, param = _wrapped_param(mod, cfg.get("target_parameters") or [], file)
        name = f"{bare}.{param}" if param else mod  # PEFT matches patterns against the adapted parameter's path
        r = _pattern_value(rank_pat, name, r_default)
        alpha = _pattern_value(alpha_pat, name, alpha_default)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if param is not None:
            if init is not None:
                raise UserError(f"{file}: init_lora_weights={init!r} on the parameter LoRA of {bare}.{param} is "
                                "not supported")  # fmt: skip
            ad.experts[f"{bare}.{param}"] = _expert_lora(bare, param, p, r, scale * weight, file)
            continue
        embedding = "embA" in p
        a, b = (p.get("embA"), p.get("embB")) if embedding else (p.get("A.weight"), p.get("B.weight"))
        if a is None or b is None:
            raise UserError(f"{file}: module {mod} has only one of its two LoRA matrices")
        A, B = _whole(a), _whole(b)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise UserError(
                f"{file}: module {mod}: LoRA matrices A {list(A.shape)} and B {list(B.shape)} do not have rank "
                f"r={r} from adapter_config.json"
            )
        mag = _whole(p["mag"]).reshape(-1) if "mag" in p else None
        bias = _whole(p["B.bias"]) if "B.bias" in p else None
        fifo = bool(cfg.get("fan_in_fan_out")) and not embedding
        part_init = None if embedding else init  # PEFT's embedding LoRA leaves the base embedding as it is
        ad.lora[mod] = LoraPart(mod, A, B, scale * weight, embedding, fifo, mag, bias, part_init, scale)
    if not ad.lora and not ad.full and not ad.experts:
        raise UserError(f"{file}: the adapter holds no tensors")
    return ad


def _wrapped_param(mod: str, targets: list[str], file: Path) -> tuple[str, str | None]:
    """(module, parameter) of a LoRA module path: the parameter a PEFT ParamWrapper adapts (by its nesting depth)
    when `target_parameters` names parameters of that module, else (mod, None) for an ordinary module LoRA."""
    bare, depth = mod, 0
    while bare.endswith(".base_layer"):
        bare, depth = bare.removesuffix(".base_layer"), depth + 1
    experts = bare.endswith(".experts")  # the module transformers 5 keeps an MoE layer's fused experts in
    hit = [
        p
        for p in EXPERT_PARAMS
        if experts and any(f"{bare}.{p}" == t or f"{bare}.{p}".endswith("." + t) for t in targets)
    ]
    if not hit:
        if depth:
            raise UserError(f"{file}: LoRA on {mod}: target_parameters {targets} other than MoE experts "
                            f"({', '.join(EXPERT_PARAMS)}) are not supported")  # fmt: skip
        return mod, None  # a module LoRA (a 2-D `weight` parameter LoRA is one too: PEFT's delta is B @ A)
    if depth >= len(hit):
        raise UserError(f"{file}: LoRA on {mod} nests deeper than the {len(hit)} targeted parameter(s) {hit}")
    return bare, hit[len(hit) - 1 - depth]


def _expert_lora(module: str, param: str, p: dict[str, Source], r: int, scale: float, file: Path) -> ExpertLora:
    if set(p) != {"A.weight", "B.weight"}:
        raise UserError(f"{file}: parameter LoRA on {module}.{param} must have lora_A and lora_B weights only")
    A, B = _whole(p["A.weight"]), _whole(p["B.weight"])
    n = A.shape[0] // r if A.dim() == 2 else 0
    if n == 0 or A.shape[0] != n * r or B.dim() != 2 or B.shape[1] != n * r:
        raise UserError(
            f"{file}: parameter LoRA on {module}.{param}: A {list(A.shape)} and B {list(B.shape)} are not "
            f"(experts*r, in) and (out, experts*r) for r={r}"
        )
    return ExpertLora(module, param, A, B, scale, n)


def match_tensor(name: str, names: Mapping) -> str | None:
    """The base tensor an adapter name refers to: exact, else the one unique name sharing its dotted tail; names that
    transformers 5 spells differently from released checkpoints (Mixtral's MoE block) are tried both ways."""
    for cand in (name, *(name.replace(a, b) for a, b in _CHECKPOINT_RENAMES if a in name)):
        if cand in names:
            return cand
        hits = [n for n in names if n.endswith("." + cand) or cand.endswith("." + n)]
        if len(hits) == 1:
            return hits[0]
    return None


def expert_targets(
    ex: ExpertLora, shapes: Mapping[str, tuple[int, ...]], label: str, base_dir: Path
) -> list[tuple[str, int | None, int, int]]:
    """The base tensors a parameter LoRA on fused experts changes, as (name, expert, row0, row1): the fused
    (experts, out, in) tensor when the checkpoint keeps it so (expert None, all rows), else each expert's own tensors
    (gate and up: the first and second half of gate_up's rows). UserError when the base has no such tensors."""
    n, out, inp = ex.experts, ex.B.shape[0], ex.A.shape[1]
    where = f"{label}: parameter LoRA on {ex.module}.{ex.param} ({n} experts, {out}x{inp})"
    fused = match_tensor(f"{ex.module}.{ex.param}", shapes)
    if fused is not None:
        if tuple(shapes[fused]) != (n, out, inp):
            raise UserError(f"{where} does not fit {fused} {list(shapes[fused])} of {base_dir}")
        return [(fused, None, 0, out)]
    hits: list[tuple[str, int | None, int, int]] = []
    for e in range(n):
        row = 0
        for names in _EXPERT_PARTS[ex.param]:
            hit = next((h for leaf in names if (h := match_tensor(f"{ex.module}.{e}.{leaf}.weight", shapes))), None)
            if hit is None:
                raise UserError(f"{where}: expert {e}'s {' or '.join(names)} is absent from the base model {base_dir}")
            rows, cols = shapes[hit] if len(shapes[hit]) == 2 else (0, 0)
            if cols != inp or row + rows > out:
                raise UserError(f"{where} does not fit {hit} {list(shapes[hit])} of {base_dir}")
            hits.append((hit, e, row, row + rows))
            row += rows
        if row != out:
            raise UserError(f"{where}: expert {e}'s tensors in {base_dir} have {row} rows, the LoRA changes {out}")
    return hits


# ---------------------------------------------------------------------------------------------------------------
# Does an adapter belong to this base? (merge, gguf --adapter, export, verify)

FINGERPRINT_KEY = "base_fingerprint"  # train's exporter_manifest.json settings: `base_fingerprint(model_dir)`
_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size")  # fmt: skip
_SAMPLE_BYTES = 1 << 16  # bytes of each tensor that go into the weights digest


def _vocab_digest(vocab: Mapping[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def _weights_digests(model_dir: Path) -> tuple[str | None, str | None]:
    """(sha256 of every tensor's name, dtype and shape; sha256 of the first 64 KiB of every tensor's bytes), over
    the dir's safetensors files in name order (sharding does not matter); (None, None) without safetensors."""
    from exporter.safetensors_file import ITEMSIZE, pread_exact
    from exporter.safetensors_file import read_header as read_entries

    entries = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        entries.update({name: (f, e) for name, e in read_entries(f).items()})
    if not entries:
        return None, None
    layout, weights = hashlib.sha256(), hashlib.sha256()
    fds: dict[Path, int] = {}
    try:
        for name in sorted(entries):
            f, e = entries[name]
            layout.update(json.dumps([name, e.dtype, list(e.shape)]).encode())
            n = min(_SAMPLE_BYTES, math.prod(e.shape) * ITEMSIZE[e.dtype])
            buf = bytearray(n)
            if f not in fds:
                fds[f] = os.open(f, os.O_RDONLY)
            pread_exact(fds[f], buf, e.start, f, name)
            weights.update(buf)
    finally:
        for fd in fds.values():
            os.close(fd)
    return layout.hexdigest(), weights.hexdigest()


def _config_facts(model_dir: Path) -> dict[str, Any]:
    config = read_json(model_dir / "config.json", optional=True)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    sizes = {k: text.get(k, config.get(k)) for k in _SIZE_KEYS}
    return {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
            "sizes": {k: v for k, v in sizes.items() if v is not None}}  # fmt: skip


def base_fingerprint(model_dir: Path) -> dict[str, Any]:
    """What identifies a base model cheaply (a few MB read, whatever its size), for train to record in its manifest
    under `FINGERPRINT_KEY`: config.json's model_type, architectures and sizes, a sha256 of the vocabulary, and
    sha256s of the tensor layout and of the first 64 KiB of every tensor (dtype-dependent)."""
    vocab = vocabulary(model_dir)
    layout, weights = _weights_digests(model_dir)
    return {**_config_facts(model_dir), "vocab_sha256": _vocab_digest(vocab) if vocab else None,
            "tensors_sha256": layout, "weights_sha256": weights}  # fmt: skip


def _model_name(source: str) -> str:
    """The model's name in a path or hub id: the last part, or `name` of a hub cache's `models--org--name`."""
    parts = [p for p in Path(str(source)).parts if p not in ("/", "")]
    for p in reversed(parts):
        if p.startswith("models--"):
            return p.split("--")[-1].lower()
    return parts[-1].lower() if parts else ""


def _vocab_difference(adapter: Mapping[str, int], base: Mapping[str, int]) -> str | None:
    """How the adapter's tokenizer fails to extend the base's (same ids; added tokens allowed), or None."""
    for token, tid in sorted(base.items(), key=lambda kv: kv[1]):
        if adapter.get(token) != tid:
            there = f"id {adapter[token]}" if token in adapter else "absent"
            return (f"its tokenizer ({len(adapter)} tokens) is not the base's ({len(base)} tokens): token {token!r} "
                    f"is id {tid} in the base, {there} in the adapter's")  # fmt: skip
    return None


def check_base(adapter_dir: Path, base_dir: Path, label: str) -> str | None:
    """Refuse (UserError naming both) an adapter that was definitely trained on another base: its tokenizer does not
    hold the base's vocabulary with the same ids, or the base fingerprint train recorded in its manifest names
    another model_type, architecture, sizes or vocabulary. Returns a note (else None) for weaker signs: the
    recorded weights digest differs (another fine-tune of the same model?), or only adapter_config.json's
    base_model_name_or_path names another model (paths move between machines, so that is never a refusal).
    Adapters from elsewhere (no manifest, no tokenizer) pass on their tensor shapes alone."""
    named = str(read_json(adapter_dir / "adapter_config.json", optional=True).get("base_model_name_or_path") or "")
    where = f"adapter {label} was trained on another base than {base_dir}" + (f" (on {named})" if named else "")
    from exporter.manifest import MANIFEST_NAME

    doc = read_json(adapter_dir / MANIFEST_NAME, optional=True)
    recorded = (doc.get("settings") or {}).get(FINGERPRINT_KEY) if isinstance(doc, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    if recorded:
        now = _config_facts(base_dir)
        for key in ("model_type", "architectures"):
            if recorded.get(key) and now[key] and recorded[key] != now[key]:
                raise UserError(f"{where}: its manifest records {key} {recorded[key]}, the base has {now[key]}")
        sizes = recorded.get("sizes") if isinstance(recorded.get("sizes"), dict) else {}
        for key, value in sizes.items():
            if key in now["sizes"] and now["sizes"][key] != value:
                raise UserError(f"{where}: its manifest records {key} {value}, the base has {now['sizes'][key]}")
    base_vocab = vocabulary(base_dir)
    ad_vocab = vocabulary(adapter_dir) if base_vocab else None
    if base_vocab and ad_vocab and (diff := _vocab_difference(ad_vocab, base_vocab)):
        raise UserError(f"{where}: {diff}")
    # the recorded digest decides only for an adapter without a tokenizer of its own (the base's tokenizer files
    # may be another form of the same vocabulary: tokenizer.json, or tokenizer.model with its added tokens)
    digest = recorded.get("vocab_sha256")
    if base_vocab and not ad_vocab and digest and digest != _vocab_digest(base_vocab):
        raise UserError(f"{where}: the base's vocabulary differs from the one recorded in its manifest")
    if recorded.get("weights_sha256"):
        layout, weights = _weights_digests(base_dir)
        if layout == recorded.get("tensors_sha256"):
            if weights == recorded["weights_sha256"]:
                return None  # the very weights it was trained on
            return (
                f"note: the weights of {base_dir} are not the ones adapter {label} was trained on (its manifest's "
                "weights digest differs: another fine-tune of that model?); its changes apply to these"
            )
    if named and _model_name(named) != _model_name(str(base_dir)):
        return f"note: adapter {label} was trained on {named} (adapter_config.json); using the base {base_dir}"
    return None
