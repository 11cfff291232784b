"""The `hf` backend: transformers for a base dir, base + PEFT adapter (attached, not merged), a merged dir or an
`exporter quantize` output dir.

Continuous batching over one left-padded KV cache: new prompts are prefilled together (left-padded) and their
cache rows joined to the running batch (the shorter side padded on the left); a finished sequence's row is dropped
and all-padding columns trimmed. A batch of one runs without padding or mask, exactly like a plain forward loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporter.config import read_json_object
from exporter.engine.api import DTYPES, LoadOptions
from exporter.engine.scheduler import Feed
from exporter.errors import UserError
from exporter.hf_dir import load_tokenizer, tokenizer_dir


def _torch_dtype(name: str, device: str, quantized: bool) -> Any:
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":  # CPUs are slow at half precision; quantized dirs keep what their config says
        return "auto" if device != "cpu" or quantized else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _read_config(model_dir: Path) -> dict[str, Any]:
    from exporter.config import read_json

    return read_json(model_dir / "config.json")


def _devices() -> list[str]:
    """The devices torch can use here: cpu, then cuda:0 ... (and mps, xpu ... where present)."""
    import torch

    out = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        mod, flags = getattr(torch, kind, None), getattr(torch.backends, kind, None)
        try:
            available = (getattr(mod, "is_available", None) or getattr(flags, "is_available", None) or bool)()
            n = int(getattr(mod, "device_count", lambda: 1)()) if available else 0
        except Exception:  # a backend that cannot even count its devices has none to offer
            n = 0
        out += [f"{kind}:{i}" for i in range(n)]
    return out


def resolve_device(name: str | None) -> str:
    """The device to load on (default: cuda when available, else cpu); UserError naming --device and the devices
    this machine has when `name` is not one of them."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    have = _devices()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or (dev.type != "cpu" and f"{dev.type}:{dev.index or 0}" not in have):
        raise UserError(f"--device {name!r}: not available here (this machine has: {', '.join(have)})")
    return name


def load_model(model_dir: Path, adapter: Path | None, opts: LoadOptions) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, device). The tokenizer comes from the adapter dir when it has one (the
    training template and any added tokens live there), else from the model dir; it loads first (one line when it
    cannot, before the weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tokenizer_dir(model_dir, adapter))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    quantized = isinstance(_read_config(model_dir).get("quantization_config"), dict)
    kw: dict[str, Any] = {"dtype": _torch_dtype(opts.dtype, device, quantized)}
    if device != "cpu":
        kw["device_map"] = device
    from exporter import quiet

    try:
        with quiet.library_quiet():  # a GPT-QModel dir imports it, banner and all
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False, **kw)
    except ImportError as e:
        raise UserError(f"{model_dir}: {e} (quantized dirs need: pip install 'exporter[quant]')") from None
    if adapter is not None:
        from peft import PeftModel

        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), tok, device


def token_bytes(tok: Any, token: int) -> bytes:
    """The bytes a token stands for, also when they are part of a UTF-8 character (decoding gives U+FFFD there):
    a byte-fallback piece `<0xE4>`, or the GPT-2 byte-to-character map of byte-level BPE vocabularies."""
    text = tok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tok.convert_ids_to_tokens(token)
    if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = {c: b for b, c in bytes_to_unicode().items()}
    if isinstance(piece, str) and piece and all(c in chars for c in piece):
        return bytes(chars[c] for c in piece)
    return text.encode("utf-8")


def eos_ids(model_dir: Path, tok: Any) -> set[int]:
    """End ids the model declares: generation_config.json `eos_token_id` (int or list) and the tokenizer's eos."""
    ids: set[int] = set()
    v = read_json_object(model_dir / "generation_config.json", optional=True).get("eos_token_id")
    ids.update([v] if isinstance(v, int) else [int(x) for x in v or [] if isinstance(x, int)])
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def bos_prefix(tok: Any) -> list[int]:
    """The ids the tokenizer puts before a text of its own (a BOS), without those it appends (an EOS)."""
    ids, plain = list(tok("a")["input_ids"]), list(tok("a", add_special_tokens=False)["input_ids"])
    k = next((k for k in range(len(ids) - len(plain) + 1) if ids[k : k + len(plain)] == plain), 0)
    return ids[:k]


class HFBackend:
    """A transformers model + tokenizer behind the scheduler's `Backend` protocol, plus scoring."""

    chunked_prefill = False
    batch_tokens = None

    def __init__(self, model: Any, tok: Any, device: str, ctx: int | None = None) -> None:
        self.model, self.tok, self.device = model, tok, device
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_pos = int(getattr(cfg, "max_position_embeddings", None) or 1 << 20)
        self.n_ctx = min(ctx, n_pos) if ctx else n_pos  # --ctx: what a prompt + answer may hold, as on gguf
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
        self.rows: list[int] = []  # slot of each batch row
        self.cache: Any = None
        self.mask: Any = None  # [rows, cache length] 1 = token, 0 = left padding
        self.pos: list[int] = []  # next position of each row

    # ---- text

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def bos_prefix(self) -> list[int]:
        return bos_prefix(self.tok)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def token_bytes(self, token: int) -> bytes:
        return token_bytes(self.tok, token)

    def special_ids(self) -> set[int]:
        """Ids of special tokens (all_special_ids and added tokens marked special)."""
        ids = set(self.tok.all_special_ids)
        ids.update(i for i, t in self.tok.added_tokens_decoder.items() if t.special)
        return ids

    # ---- forward passes

    def _forward(self, ids: Any, mask: Any, pos: Any, cache: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(
                input_ids=ids.to(self.device),
                attention_mask=None if mask is None else mask.to(self.device),
                position_ids=None if pos is None else pos.to(self.device),
                past_key_values=cache,
                use_cache=cache is not None,
            )

    def _left_pad(self, prompts: list[list[int]]) -> tuple[Any, Any, Any]:
        """(ids, mask, position ids) of left-padded prompts; mask and positions None when nothing is padded."""
        import torch

        n = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (n - len(p)) + p for p in prompts])
        if all(len(p) == n for p in prompts):
            return ids, None, None
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def step(self, feeds: list[Feed]) -> list[np.ndarray]:
        import torch
        from transformers import DynamicCache

        index = {s: r for r, s in enumerate(self.rows)}
        old = [f for f in feeds if f.seq in index]
        new = [f for f in feeds if f.seq not in index]
        if sorted(f.seq for f in old) != sorted(self.rows) or any(len(f.ids) != 1 for f in old):
            raise RuntimeError("hf backend: every running sequence must get exactly one token per step")
        out: dict[int, np.ndarray] = {}
        if old:
            order = sorted(old, key=lambda f: index[f.seq])
            ids = torch.tensor([[f.ids[0]] for f in order])
            self.mask = torch.cat([self.mask, torch.ones(len(order), 1, dtype=self.mask.dtype)], dim=1)
            padded = bool((self.mask == 0).any())
            pos = torch.tensor(self.pos)[:, None] if padded else None
            res = self._forward(ids, self.mask if padded else None, pos, self.cache)
            self.cache = res.past_key_values
            logits = res.logits[:, -1].float().cpu().numpy()
            for r, f in enumerate(order):
                out[f.seq] = logits[r]
            self.pos = [p + 1 for p in self.pos]
        if new:
            ids, mask, pos = self._left_pad([f.ids for f in new])
            res = self._forward(ids, mask, pos, DynamicCache())
            logits = res.logits[:, -1].float().cpu().numpy()
            for r, f in enumerate(new):  # `every`: the rows of its own tokens (after its left padding)
                out[f.seq] = res.logits[r, -len(f.ids) :].float().cpu().numpy() if f.every else logits[r]
            mask = mask if mask is not None else torch.ones(ids.shape, dtype=torch.long)
            self._join(res.past_key_values, mask, [f.seq for f in new], [len(f.ids) for f in new])
        return [out[f.seq] for f in feeds if f.want or f.every]

    def _join(self, cache: Any, mask: Any, slots: list[int], lengths: list[int]) -> None:
        """Append new rows to the running batch, padding the shorter cache on the left."""
        import torch

        if self.cache is None:
            self.cache, self.mask, self.rows, self.pos = cache, mask, list(slots), list(lengths)
            return
        a, b = self.mask.shape[1], mask.shape[1]
        n = max(a, b)

        def pad(t: Any, k: int) -> Any:  # left-pad dim -2 (cache: [B, H, L, D]) or -1 (mask: [B, L])
            return t if k == 0 else torch.nn.functional.pad(t, (0, 0, k, 0) if t.dim() == 4 else (k, 0))

        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, n - a), pad(theirs.keys, n - b)], dim=0)
            mine.values = torch.cat([pad(mine.values, n - a), pad(theirs.values, n - b)], dim=0)
        self.mask = torch.cat([pad(self.mask, n - a), pad(mask, n - b)], dim=0)
        self.rows += slots
        self.pos += lengths

    def release(self, seq: int, broken: bool = False) -> None:
        """Drop `seq`'s rows from the batch (nothing of it stays behind, `broken` or not)."""
        if seq not in self.rows:
            return
        r = self.rows.index(seq)
        del self.rows[r], self.pos[r]
        if not self.rows:
            self.cache = self.mask = None
            return
        import torch

        keep = torch.tensor([i for i in range(self.mask.shape[0]) if i != r])
        self.mask = self.mask[keep]
        lead = int((self.mask.cumsum(-1) == 0).sum(-1).min())  # padding columns every row has
        self.mask = self.mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[keep.to(layer.keys.device), :, lead:]
            layer.values = layer.values[keep.to(layer.values.device), :, lead:]

    # ---- scoring

    def logits(self, ids: list[int], seq: int | None = None) -> np.ndarray:
        """[len(ids), vocab] float32 logits of one sequence (one forward, no cache)."""
        import torch

        return self._forward(torch.tensor([ids]), None, None, None).logits[0].float().cpu().numpy()

    def next_logits(self, prompts: list[list[int]], seq: int | None = None) -> np.ndarray:
        """[len(prompts), vocab] logits after the last token of each prompt (left-padded, one forward)."""
        ids, mask, pos = self._left_pad(prompts)
        return self._forward(ids, mask, pos, None).logits[:, -1].float().cpu().numpy()
