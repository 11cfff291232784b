"""Fast, exact numpy encoders for the GGUF tensor types we write directly (no torch).

Each gives the bytes gguf-py's reference `gguf.quants.quantize` gives (and so llama.cpp's converter), checked in
tests/test_gguf.py (all 65,536 bf16 values for `bf16_to_f16`; random, tie and zero blocks for `q8_0`). They are
faster because they make fewer passes over the data and, given a `Scratch`, allocate no new block-sized arrays:
fresh large arrays are fresh pages the kernel must fault in and zero, which cost more than the arithmetic here.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

T = gguf.GGMLQuantizationType

_HALF_DOWN = np.nextafter(np.float32(0.5), np.float32(0))  # 0.5 - 2**-25


class Scratch:
    """Work buffers reused from block to block (one per thread); `take` hands out views of them."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def take(self, key: str, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
        """An uninitialised array of `shape`/`dtype` backed by buffer `key` (valid until `key` is taken again)."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self._bufs.get(key)
        if buf is None or buf.nbytes < n:
            buf = self._bufs[key] = np.empty(max(n, 1), dtype=np.uint8)
        return buf[:n].view(dtype).reshape(shape)


def _take(scratch: Scratch | None, key: str, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
    return scratch.take(key, shape, dtype) if scratch is not None else np.empty(shape, dtype=dtype)


def bf16_to_f32(raw: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32: bf16 is the top half of an f32."""
    out = _take(scratch, "f32", raw.shape, np.uint32)
    np.left_shift(raw, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def bf16_to_f16(raw: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """bf16 bit patterns (uint16) -> f16 bit patterns (uint16), equal to `f32.astype(float16)` (round to nearest even).

    Inside f16's normal range a bf16 value is exact in f16: re-bias the exponent and widen the 7-bit mantissa. The
    few values outside it (zero, f16 subnormals, overflow, inf, nan) go through numpy's f32 -> f16 cast.
    """
    sign = np.bitwise_and(raw, np.uint16(0x8000), out=_take(scratch, "sign", raw.shape, np.uint16))
    t = np.bitwise_xor(raw, sign, out=_take(scratch, "f16", raw.shape, np.uint16))  # magnitude
    t -= np.uint16(113 << 7)  # wraps below f16's smallest normal exponent
    outside = np.greater_equal(t, np.uint16(30 << 7), out=_take(scratch, "mask", raw.shape, np.bool_))
    t += np.uint16(1 << 7)
    t <<= np.uint16(3)
    t |= sign
    idx = np.flatnonzero(outside)
    if idx.size:
        with np.errstate(over="ignore"):
            t.reshape(-1)[idx] = bf16_to_f32(raw.reshape(-1)[idx]).astype(np.float16).view(np.uint16)
    return t


def nudge_half_away(v: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """`v += copysign(0.5 - 2**-25, v)` in place (two integer passes): truncating then rounds half away from zero.

    For every f32 |v| < 2**23 this equals C's `roundf` and gguf-py's `np_roundf`: a tie lands exactly on the next
    integer, and no other value crosses one.
    """
    half = np.bitwise_and(v.view(np.uint32), np.uint32(0x80000000), out=_take(scratch, "half", v.shape, np.uint32))
    half |= _HALF_DOWN.view(np.uint32)
    v += half.view(np.float32)
    return v


def q8_0(x: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """Q8_0 blocks (f16 scale + 32 int8) of an f32 array whose last axis divides by 32, as gguf-py writes them.

    Same arithmetic as gguf-py, fewer passes: block maxima by pairwise maximum, rounding by `nudge_half_away` and
    the int8 cast, both written straight into the output rows.
    """
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    n_blocks = blocks.shape[0]
    flat = np.abs(blocks, out=_take(scratch, "abs", blocks.shape, np.float32)).reshape(-1)
    ping, pong = (
        _take(scratch, "ping", (flat.size // 2,), np.float32),
        _take(scratch, "pong", (flat.size // 4,), np.float32),
    )
    for level in range(5):  # pairwise maxima of neighbours: 32 -> 1 per block, without numpy's per-row reduce overhead
        dest = (ping, pong)[level % 2][: flat.size // 2]
        flat = np.maximum(flat[0::2], flat[1::2], out=dest)
    d = flat / np.float32(127)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    v = np.multiply(blocks, inv[:, None], out=_take(scratch, "scaled", blocks.shape, np.float32))
    nudge_half_away(v, scratch)
    out = _take(scratch, "q8_0", (n_blocks, 34), np.uint8)
    out.view(np.uint16)[:, 0] = d.astype(np.float16).view(np.uint16)
    np.copyto(out[:, 2:].view(np.int8), v, casting="unsafe")  # float -> int8 truncates toward zero
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 34)


# signed and unsigned integer views of each stored dtype, and the float type of its bits
_VIEWS = {"BF16": (np.int16, np.uint16, np.float32), "F16": (np.int16, np.uint16, np.float16),
          "F32": (np.int32, np.uint32, np.float32)}  # fmt: skip
# for each output type, the |value| from which a value (or a block's f16 scale: amax/127, amax/8) rounds to inf
OVERFLOW = {T.F16: 65520.0, T.Q8_0: 65520.0 * 127, T.Q4_0: 65520.0 * 8, T.BF16: 3.3961e38, T.F32: math.inf}


def max_abs(raw: np.ndarray, dtype: str) -> float:
    """Largest |value| of a block in its stored dtype ("BF16" as uint16 bits, "F16", "F32"): nan or inf when the
    block holds one. Two read-only integer max passes and no temporaries: a float's bits, read as a signed integer,
    grow with the magnitude of positive values, and read as unsigned, with that of negative ones (sign bit set);
    NaN's bit patterns sort above inf's."""
    if raw.size == 0:
        return 0.0
    signed, unsigned, ftype = _VIEWS[dtype]
    sign = 1 << (8 * np.dtype(unsigned).itemsize - 1)
    top = max(int(raw.view(signed).max()), int(raw.view(unsigned).max()) - sign, 0)
    if dtype == "BF16":
        return float(np.array(top << 16, dtype=np.uint32).view(np.float32))
    return float(np.array(top, dtype=unsigned).view(ftype))


def encode(x: np.ndarray, qtype: T, scratch: Scratch | None = None) -> np.ndarray:
    """The bytes of f32 rows `x` as `qtype` (a view of `scratch` when given: write it out before the next block)."""
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        out = _take(scratch, "f16", x.shape, np.float16)
        np.copyto(out, x, casting="same_kind")
        return out
    if qtype == T.Q8_0 and x.shape[-1] % 32 == 0:
        return q8_0(x, scratch)
    return gguf.quants.quantize(x, qtype)
