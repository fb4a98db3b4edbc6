"""The numpy reference of lowbit's ops — the oracle the native kernels and the tests are held to.

Everything here follows :mod:`lowbit.runtime.ops` to the letter, in float32:

* decoding: uniform Ŵ[n, k] = (code − zp[n, b])·scales[n, b], codebook Ŵ[n, k] =
  levels[n, b, code]·scales[n, b] (levels[n, 0, code] for a [N, 1, 2^bits] row table),
  b = k // block_size; the padded columns of the last block are
  never read (they multiply nothing);
* ``accuracy="float"``: y = A·Ŵᵀ in float32;
* ``accuracy="int8"``: per row of A and block b, amax = max |a_k|, q = rint(a·(127/amax))
  (float32, ties to even; q = 0 when amax = 0), y = Σ_b (amax/127)·s'[n, b]·Σ_k q_k·w_int[n, k]
  with w_int = code − zp (uniform) or rint(levels·127/lmax) and s' = scales·lmax/127 rounded to
  float16 (codebook; ``lowbit.quant.grid.half_rounded``);
  the integer sums are exact (|q·w| ≤ 127², at most 256 terms: < 2^24, exact in float32);
* ConvLowBit = im2col (column order c·kh·kw + ky·kw + kx, per group) then the MatMulLowBit
  arithmetic on each patch row, then (+ bias) + Z and the clamp, each a float32 addition as
  onnxruntime's Add does it; Hadamard = the fast Walsh–Hadamard butterflies per group, rows
  permuted to sequency order by ``ops.sequency_permutation``.

Bad inputs raise ``ValueError`` naming the input or attribute, as the native ops fail the run.

onnxruntime-extensions path (when the native library is absent)
---------------------------------------------------------------
onnxruntime-extensions runs Python functions as ops of the fixed domain ``ai.onnx.contrib``, with
fixed input types, every declared attribute present, and no absent inputs. ``prepare(model_bytes)``
therefore rewrites each ``lowbit`` node into ``ai.onnx.contrib.Lowbit<Op>`` with

* every optional input filled (absent → an empty constant of shape [0], read back as None);
* one string attribute ``config``: the node's attributes, defaults filled in, as JSON (exact
  floats, list attributes, the node name for messages);
* a guard before the op: a one-output ``Split`` of the activation's last dimension (Hadamard,
  MatMulLowBit) or channels (ConvLowBit) into exactly the expected size — the identity when it is
  right — so a wrong activation shape fails the run as an onnxruntime error whose node name says
  what is wrong.

A Python op that raises takes the whole process down (onnxruntime-extensions 0.15 lets the
exception escape the kernel), so everything that can be checked before running is checked by
``prepare`` — attributes, and the constant inputs (packed weight length, scales shape, NaN scales,
zero points, levels) — raising ``ValueError`` naming the node and input; the Python functions
themselves never raise: an error they still meet (a non-constant weight input that is wrong, a
ConvLowBit residual ``Z`` — a run-time tensor, of which ``prepare`` checks only the static rank and
channels — whose shape is not Y's) is printed to stderr and the output is NaN.
``register(session_options)`` registers the extensions library and declares the Python ops (once
per process).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from lowbit.quant.grid import half_rounded
from lowbit.runtime import ops

_F32 = np.float32

# ------------------------------------------------------------------------------------ validation


def check_weight_attributes(*, K, N, bits, block_size, format="uniform", accuracy="float") -> None:
    """The MatMulLowBit/ConvLowBit attributes; ``ValueError`` naming the attribute."""
    for name, value in (("K", K), ("N", N)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"attribute '{name}' must be an integer ≥ 1, not {value!r}")
    if bits not in ops.BITS:
        raise ValueError(f"attribute 'bits' must be one of {', '.join(map(str, ops.BITS))}, not {bits!r}")
    if block_size not in ops.BLOCK_SIZES:
        raise ValueError(f"attribute 'block_size' must be one of {', '.join(map(str, ops.BLOCK_SIZES))}, not {block_size!r}")
    if format not in ops.FORMATS:
        raise ValueError(f"attribute 'format' must be one of {', '.join(ops.FORMATS)}, not {format!r}")
    if accuracy not in ops.ACCURACIES:
        raise ValueError(f"attribute 'accuracy' must be one of {', '.join(ops.ACCURACIES)}, not {accuracy!r}")


def _check_array(name: str, array, dtype, shape: tuple[int, ...] | None) -> None:
    if array is None:
        return
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"input '{name}' must be {np.dtype(dtype).name}, not {got}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise ValueError(f"input '{name}' has shape {list(array.shape)}, expected {list(shape)}")


def check_weight(W, scales, zero_points, levels, bias, *, K, N, bits, block_size, format="uniform",
                 accuracy="float") -> None:
    """Attributes and the packed-weight inputs (any of which may be None: not known)."""
    check_weight_attributes(K=K, N=N, bits=bits, block_size=block_size, format=format, accuracy=accuracy)
    blocks = ops.blocks(K, block_size)
    if W is not None:
        _check_array("W", W, np.uint8, None)
        expected = ops.packed_shape(N, K, bits, block_size)
        if W.size != int(np.prod(expected)):
            raise ValueError(f"input 'W' holds {W.size} bytes, expected {int(np.prod(expected))} "
                             f"(shape {list(expected)} for N={N}, K={K}, bits={bits}, block_size={block_size})")
        if W.shape != expected:
            raise ValueError(f"input 'W' has shape {list(W.shape)}, expected {list(expected)}")
    _check_array("scales", scales, np.float32, (N, blocks))
    if scales is not None and not np.all(np.isfinite(scales)):
        raise ValueError(f"input 'scales' holds {int(np.size(scales) - np.isfinite(scales).sum())} NaN or infinite values")
    if zero_points is not None:
        if format != "uniform":
            raise ValueError("input 'zero_points' is only taken with format=uniform")
        _check_array("zero_points", zero_points, np.uint8, (N, blocks))
        if zero_points.size and int(zero_points.max()) >= 1 << bits:
            raise ValueError(f"input 'zero_points' holds {int(zero_points.max())}, not below 2^bits = {1 << bits}")
    if format == "uniform" and levels is not None:
        raise ValueError("input 'levels' is refused with format=uniform (use format=codebook)")
    if format == "codebook":
        if levels is None:
            raise ValueError("input 'levels' is required with format=codebook")
        shared = isinstance(levels, np.ndarray) and levels.ndim == 3 and levels.shape[1] == 1
        _check_array("levels", levels, np.float32, (N, 1 if shared else blocks, 1 << bits))
        if not np.all(np.isfinite(levels)):
            raise ValueError("input 'levels' holds NaN or infinite values")
    _check_array("bias", bias, np.float32, (N,))


def _check_activation(name: str, x, last: int | None, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"input '{name}' must be float32, not {got}")
    if last is not None and (x.ndim < 1 or x.shape[-1] != last):
        raise ValueError(f"input '{name}' has shape {list(x.shape)}; its last dimension must be {what}")
    return x


# ------------------------------------------------------------------------------------ packing


def pack(codes: np.ndarray, bits: int, block_size: int, *, pad_code: int = 0) -> np.ndarray:
    """Unsigned codes[N, K] → the packed ``W`` [N, blocks, block_size·bits/8] (padding columns
    hold ``pad_code``; 2^(bits−1) makes them decode to zero with the default zero point)."""
    from lowbit.quant.emit import pack_bits

    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, K], not shape {list(codes.shape)}")
    if bits not in ops.BITS:
        raise ValueError(f"bits must be one of {ops.BITS}, not {bits!r}")
    if block_size not in ops.BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {ops.BLOCK_SIZES}, not {block_size!r}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in 0 … {(1 << bits) - 1}")
    n, k = codes.shape
    blocks = ops.blocks(k, block_size)
    padded = np.full((n, blocks * block_size), pad_code, dtype=np.uint8)
    padded[:, :k] = codes
    return pack_bits(padded.reshape(n, blocks, block_size), bits)


def unpack(W: np.ndarray, K: int, bits: int, block_size: int) -> np.ndarray:
    """The packed ``W`` → unsigned codes[N, K] (uint8), the padding columns dropped."""
    from lowbit.quant.emit import unpack_bits

    n, blocks, _ = W.shape
    return unpack_bits(W, bits).reshape(n, blocks * block_size)[:, :K]


def decode(W, scales, zero_points=None, levels=None, *, K, N, bits, block_size, format="uniform") -> np.ndarray:
    """Ŵ[N, K] in float32 (ops.py's decoding), after validating the inputs."""
    check_weight(W, scales, zero_points, levels, None, K=K, N=N, bits=bits, block_size=block_size, format=format)
    return _decode(W, scales, zero_points, levels, K, bits, block_size, format)


def _block_of(K: int, block_size: int) -> np.ndarray:
    return np.arange(K) // block_size


def _per_block(levels: np.ndarray, blocks: int) -> np.ndarray:
    """levels [N, blocks, 2^bits] as given, or a row table [N, 1, 2^bits] repeated for every block."""
    return np.broadcast_to(levels, (levels.shape[0], blocks, levels.shape[2]))


def _decode(W, scales, zero_points, levels, K, bits, block_size, format) -> np.ndarray:
    codes = unpack(W, K, bits, block_size)
    b = _block_of(K, block_size)
    if format == "codebook":
        rows = np.arange(codes.shape[0])[:, None]
        levels = _per_block(levels, scales.shape[1])
        return (levels[rows, b[None, :], codes] * scales[:, b]).astype(_F32)
    zp = _zero_points(zero_points, scales.shape, bits)
    return ((codes.astype(_F32) - zp[:, b].astype(_F32)) * scales[:, b]).astype(_F32)


def _zero_points(zero_points, shape, bits) -> np.ndarray:
    return np.full(shape, 1 << (bits - 1), dtype=np.uint8) if zero_points is None else zero_points


def _int8_weight(W, scales, zero_points, levels, K, bits, block_size, format):
    """(w_int[N, blocks, block_size] float32 with zero padding, s'[N, blocks] float32)."""
    codes = unpack(W, K, bits, block_size)
    n = codes.shape[0]
    blocks = ops.blocks(K, block_size)
    b = _block_of(K, block_size)
    if format == "codebook":
        levels = _per_block(levels, blocks)
        lmax = np.abs(levels).max(axis=2)  # [N, blocks]
        safe = np.where(lmax > 0, lmax, _F32(1))
        table = np.rint(levels * (_F32(127) / safe)[:, :, None]).astype(_F32)
        table[lmax == 0] = 0
        w = table[np.arange(n)[:, None], b[None, :], codes]
        s = half_rounded((scales * (lmax / _F32(127))).astype(_F32))
    else:
        zp = _zero_points(zero_points, scales.shape, bits)
        w = codes.astype(_F32) - zp[:, b].astype(_F32)
        s = scales
    full = np.zeros((n, blocks * block_size), dtype=_F32)
    full[:, :K] = w
    return full.reshape(n, blocks, block_size), s


def quantize_rows(a: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and block of K: (q[M, blocks, block_size] float32 integers, amax/127 [M, blocks])."""
    m, k = a.shape
    blocks = ops.blocks(k, block_size)
    padded = np.zeros((m, blocks * block_size), dtype=_F32)
    padded[:, :k] = a
    padded = padded.reshape(m, blocks, block_size)
    amax = np.abs(padded).max(axis=2)
    inv = np.where(amax > 0, _F32(127) / np.where(amax > 0, amax, _F32(1)), _F32(0)).astype(_F32)
    q = np.rint(padded * inv[:, :, None]).astype(_F32)
    return q, (amax / _F32(127)).astype(_F32)


def _matmul_rows(a2: np.ndarray, W, scales, zero_points, levels, K, bits, block_size, format, accuracy) -> np.ndarray:
    """a2[M, K] · Ŵᵀ → [M, N] float32 (no bias)."""
    if accuracy == "float":
        w = _decode(W, scales, zero_points, levels, K, bits, block_size, format)
        return (a2 @ w.T).astype(_F32)
    w_int, s = _int8_weight(W, scales, zero_points, levels, K, bits, block_size, format)
    q, d = quantize_rows(a2, block_size)
    y = np.zeros((a2.shape[0], W.shape[0]), dtype=_F32)
    for b in range(w_int.shape[1]):
        isum = q[:, b, :] @ w_int[:, b, :].T  # exact integers in float32
        y += (d[:, b, None] * s[None, :, b]) * isum
    return y


# ------------------------------------------------------------------------------------ the ops


def matmul_lowbit(A, W, scales, zero_points=None, levels=None, bias=None, *, K, N, bits, block_size,
                  format="uniform", accuracy="float") -> np.ndarray:
    """Y[..., N] = A[..., K]·Ŵᵀ (+ bias) — ``MatMulLowBit``."""
    check_weight(W, scales, zero_points, levels, bias, K=K, N=N, bits=bits, block_size=block_size,
                 format=format, accuracy=accuracy)
    A = _check_activation("A", A, K, f"K = {K}")
    lead = A.shape[:-1]
    a2 = A.reshape(-1, K)
    y = _matmul_rows(a2, W, scales, zero_points, levels, K, bits, block_size, format, accuracy)
    if bias is not None:
        y = y + bias
    return y.astype(_F32).reshape(*lead, N)


def conv_output_size(size: int, k: int, stride: int, dilation: int, pad_begin: int, pad_end: int) -> int:
    return (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1


def _check_conv_attributes(N, K, kernel_shape, strides, pads, dilations, group) -> tuple:
    def ints(name, value, length, minimum):
        try:
            out = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"attribute '{name}' must be a list of {length} integers, not {value!r}") from None
        if len(out) != length or any(v < minimum for v in out):
            raise ValueError(f"attribute '{name}' must be {length} integers ≥ {minimum}, not {list(out)}")
        return out

    kh, kw = ints("kernel_shape", kernel_shape, 2, 1)
    strides = ints("strides", strides, 2, 1)
    pads = ints("pads", pads, 4, 0)
    dilations = ints("dilations", dilations, 2, 1)
    if not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"attribute 'group' must be an integer ≥ 1, not {group!r}")
    if N % group:
        raise ValueError(f"attribute 'group' ({group}) must divide N ({N})")
    if K % (kh * kw):
        raise ValueError(f"attribute 'K' ({K}) must be (C / group)·kh·kw, a multiple of kh·kw = {kh * kw}")
    return (kh, kw), strides, pads, dilations


def conv_lowbit(X, W, scales, zero_points=None, levels=None, bias=None, Z=None, *, N, K, bits, block_size,
                format="uniform", accuracy="float", kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0),
                dilations=(1, 1), group=1, clip_min=-np.inf, clip_max=np.inf) -> np.ndarray:
    """Y[B, N, OH, OW] = clamp(Conv2D(X[B, C, H, W], Ŵ as [N, C/group, kh, kw]) (+ bias) (+ Z),
    clip_min, clip_max) — ``ConvLowBit``; Z float32 of exactly Y's shape (a fused residual Add)."""
    check_weight(W, scales, zero_points, levels, bias, K=K, N=N, bits=bits, block_size=block_size,
                 format=format, accuracy=accuracy)
    clip_min, clip_max = check_clip(clip_min, clip_max)
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = _check_conv_attributes(N, K, kernel_shape, strides, pads, dilations, group)
    X = _check_activation("X", X, None, "")
    per_group = K // (kh * kw)
    if X.ndim != 4 or X.shape[1] != per_group * group:
        raise ValueError(f"input 'X' has shape {list(X.shape)}; it must be [B, C, H, W] with C = "
                         f"group·K/(kh·kw) = {per_group * group}")
    batch, c, h, w = X.shape
    oh = conv_output_size(h, kh, sh, dh, pt, pb)
    ow = conv_output_size(w, kw, sw, dw, pl, pr)
    if oh < 1 or ow < 1:
        raise ValueError(f"input 'X' of spatial size {h}×{w} is smaller than the dilated kernel with these pads "
                         f"(output {oh}×{ow})")
    _check_array("Z", Z, np.float32, (batch, N, oh, ow))
    xp = np.pad(X, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]  # [B, C, OH, OW, kh, kw]
    patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(batch * oh * ow, c, kh * kw)
    n_per = N // group
    out = np.empty((batch * oh * ow, N), dtype=_F32)
    for g in range(group):
        rows = slice(g * n_per, (g + 1) * n_per)
        cols = np.ascontiguousarray(patches[:, g * per_group:(g + 1) * per_group].reshape(-1, K))
        out[:, rows] = _matmul_rows(cols, W[rows], scales[rows], None if zero_points is None else zero_points[rows],
                                    None if levels is None else levels[rows], K, bits, block_size, format, accuracy)
    if bias is not None:
        out += bias
    out = np.ascontiguousarray(out.reshape(batch, oh, ow, N).transpose(0, 3, 1, 2))
    if Z is not None:
        out += Z  # (conv + bias) + Z in float32, as onnxruntime's separate Add
    if clip_min > -np.inf or clip_max < np.inf:
        np.clip(out, np.float32(clip_min), np.float32(clip_max), out=out)
    return out.astype(_F32, copy=False)


def check_clip(clip_min, clip_max) -> tuple[float, float]:
    """ConvLowBit's fused clamp bounds, validated (``ValueError`` naming the attribute)."""
    low, high = float(clip_min), float(clip_max)
    if np.isnan(low) or np.isnan(high) or low > high:
        raise ValueError(f"attributes 'clip_min' = {low} and 'clip_max' = {high} must be numbers with clip_min <= clip_max")
    return low, high


def check_hadamard_attributes(*, size, group=None, order="natural", scale=None) -> tuple[int, str, float]:
    """(group, order, scale) with the defaults filled; ``ValueError`` naming the attribute."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"attribute 'size' must be an integer ≥ 1, not {size!r}")
    group = size if group is None else group
    if not isinstance(group, (int, np.integer)) or group < 1 or group & (group - 1) or size % group:
        raise ValueError(f"attribute 'group' must be a power of two dividing size = {size}, not {group!r}")
    if order not in ops.ORDERS:
        raise ValueError(f"attribute 'order' must be one of {', '.join(ops.ORDERS)}, not {order!r}")
    scale = float(_F32(1.0 / math.sqrt(group))) if scale is None else scale
    if not isinstance(scale, (float, int, np.floating)) or not math.isfinite(scale):
        raise ValueError(f"attribute 'scale' must be a finite number, not {scale!r}")
    return int(group), order, float(scale)


def hadamard_matrix(group: int, order: str = "natural") -> np.ndarray:
    """The ±1 group×group Walsh–Hadamard matrix H (float32) in ``order``."""
    h = np.ones((1, 1), dtype=_F32)
    while h.shape[0] < group:
        h = np.block([[h, h], [h, -h]])
    return h[ops.sequency_permutation(group)] if order == "sequency" else h


def hadamard_factors(b: np.ndarray, *, rtol: float = 1e-6) -> tuple[np.ndarray, str] | None:
    """(s, order) with x·B = Hadamard(x ∘ s) (group = size = g, default scale), i.e.
    B = diag(s)·Hᵀ/√g for the order's H — or None when B [g, g] is no such matrix."""
    b = np.asarray(b, dtype=np.float64)
    g = b.shape[0]
    if b.ndim != 2 or b.shape != (g, g) or g < 1 or g & (g - 1):
        return None
    signs = np.where(b[:, 0] < 0, -1.0, 1.0)  # H[0, j] = +1 in both orders
    for order in ops.ORDERS:
        expected = signs[:, None] * hadamard_matrix(g, order).T.astype(np.float64) / math.sqrt(g)
        if np.abs(b - expected).max() <= rtol * (1 / math.sqrt(g)) * 10:
            return signs.astype(np.float32), order
    return None


def hadamard(X, *, size, group=None, order="natural", scale=None) -> np.ndarray:
    """Y[..., g·group + i] = scale·Σ_j H[i, j]·X[..., g·group + j] — ``Hadamard`` (fast transform)."""
    group, order, scale = check_hadamard_attributes(size=size, group=group, order=order, scale=scale)
    X = _check_activation("X", X, size, f"size = {size}")
    y = X.reshape(-1, size // group, group).astype(_F32, copy=True)
    h = 1
    while h < group:  # butterflies: natural (Sylvester) order
        y = y.reshape(y.shape[0], y.shape[1], group // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = np.stack([a + b, a - b], axis=3).reshape(y.shape[0], y.shape[1], group)
        h *= 2
    if order == "sequency":
        y = y[:, :, ops.sequency_permutation(group)]
    return (y * _F32(scale)).astype(_F32).reshape(X.shape)


# ------------------------------------------------------------------------------------ onnxruntime-extensions

CONTRIB_DOMAIN = "ai.onnx.contrib"
CONTRIB_OPS = {"MatMulLowBit": "LowbitMatMulLowBit", "ConvLowBit": "LowbitConvLowBit", "Hadamard": "LowbitHadamard"}

#: (input name, numpy dtype) per op, in order; optional ones get an empty constant in ``prepare``
_SIGNATURES = {
    "MatMulLowBit": (("A", np.float32), ("W", np.uint8), ("scales", np.float32), ("zero_points", np.uint8),
                     ("levels", np.float32), ("bias", np.float32)),
    "ConvLowBit": (("X", np.float32), ("W", np.uint8), ("scales", np.float32), ("zero_points", np.uint8),
                   ("levels", np.float32), ("bias", np.float32), ("Z", np.float32)),
    "Hadamard": (("X", np.float32),),
}


def _node_config(node) -> dict:
    """The lowbit node's attributes with defaults, validated (``ValueError`` naming the attribute)."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    op = node.op_type
    if op == "Hadamard":
        unknown = set(attrs) - {"size", "group", "order", "scale"}
        if unknown:
            raise ValueError(f"unknown attribute '{sorted(unknown)[0]}'")
        if "size" not in attrs:
            raise ValueError("attribute 'size' is required")
        group, order, scale = check_hadamard_attributes(size=attrs["size"], group=attrs.get("group"),
                                                        order=attrs.get("order", "natural"), scale=attrs.get("scale"))
        return {"size": int(attrs["size"]), "group": group, "order": order, "scale": scale}
    common = {"K", "N", "bits", "block_size", "format", "accuracy"}
    conv = {"kernel_shape", "strides", "pads", "dilations", "group", "clip_min", "clip_max"}
    unknown = set(attrs) - common - (conv if op == "ConvLowBit" else set())
    if unknown:
        raise ValueError(f"unknown attribute '{sorted(unknown)[0]}'")
    for name in ("K", "N", "bits", "block_size") + (("kernel_shape",) if op == "ConvLowBit" else ()):
        if name not in attrs:
            raise ValueError(f"attribute '{name}' is required")
    config = {"K": attrs["K"], "N": attrs["N"], "bits": attrs["bits"], "block_size": attrs["block_size"],
              "format": attrs.get("format", "uniform"), "accuracy": attrs.get("accuracy", "float")}
    check_weight_attributes(**config)
    if op == "ConvLowBit":
        conv_attrs = {"kernel_shape": attrs["kernel_shape"], "strides": attrs.get("strides", (1, 1)),
                      "pads": attrs.get("pads", (0, 0, 0, 0)), "dilations": attrs.get("dilations", (1, 1)),
                      "group": attrs.get("group", 1)}
        kernel, strides, pads, dilations = _check_conv_attributes(config["N"], config["K"], **conv_attrs)
        clip_min, clip_max = check_clip(attrs.get("clip_min", -np.inf), attrs.get("clip_max", np.inf))
        config.update(kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                      dilations=list(dilations), group=int(conv_attrs["group"]), clip_min=clip_min, clip_max=clip_max)
    return {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in config.items()}


def _check_node_inputs(node, config: dict) -> None:
    """Validate the constant inputs of a MatMulLowBit/ConvLowBit node before the run."""
    names = [n for n, _ in _SIGNATURES[node.op_type]]
    if len(node.inputs) > len(names):
        raise ValueError(f"takes at most {len(names)} inputs, not {len(node.inputs)}")
    values = {name: (node.inputs[i] if i < len(node.inputs) else None) for i, name in enumerate(names)}
    for required in names[:3]:
        if values[required] is None:
            raise ValueError(f"input '{required}' is required")
    if node.op_type == "Hadamard":
        return
    from lowbit.passes.edit import const_array  # here: lowbit.passes imports this module

    arrays = {name: const_array(values[name]) for name in names[1:6]}  # the weight inputs (not Z: a run-time tensor)
    for name, dtype in _SIGNATURES[node.op_type][1:]:
        v = values[name]
        if v is not None and v.dtype is not None and v.dtype.numpy() != np.dtype(dtype):
            raise ValueError(f"input '{name}' must be {np.dtype(dtype).name}, not {v.dtype.numpy().name}")
    if values["levels"] is not None and config["format"] == "uniform":
        raise ValueError("input 'levels' is refused with format=uniform (use format=codebook)")
    if values["levels"] is None and config["format"] == "codebook":
        raise ValueError("input 'levels' is required with format=codebook")
    weight = {k: config[k] for k in ("K", "N", "bits", "block_size", "format", "accuracy")}
    check_weight(arrays["W"], arrays["scales"], arrays["zero_points"], arrays["levels"], arrays["bias"], **weight)
    z = values.get("Z")
    if z is not None and z.shape is not None:  # what its static shape already tells; the rest is checked at run time
        dims = list(z.shape)
        if len(dims) != 4 or (isinstance(dims[1], int) and dims[1] != config["N"]):
            raise ValueError(f"input 'Z' has shape {[d if isinstance(d, int) else str(d) for d in dims]}, expected "
                             f"Y's shape [B, N = {config['N']}, OH, OW]")


def prepare(model_bytes: bytes) -> bytes:
    """Rewrite every ``lowbit`` node into its ``ai.onnx.contrib`` twin (see the module docstring);
    ``ValueError`` naming the node and the input/attribute when a node is malformed."""
    import onnx
    import onnx_ir as ir

    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(model_bytes))
    found = False
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.domain != ops.DOMAIN:
            continue
        if node.op_type not in CONTRIB_OPS:
            raise ValueError(f"node '{node.name}': lowbit has no op '{node.op_type}' (it has {', '.join(CONTRIB_OPS)})")
        try:
            config = _node_config(node)
            _check_node_inputs(node, config)
        except ValueError as exc:
            raise ValueError(f"{node.op_type} node '{node.name}': {exc}") from None
        _rewrite(node, config, model.opset_imports.get("", 1))
        found = True
    if not found:
        return model_bytes
    model.opset_imports[CONTRIB_DOMAIN] = 1
    if not any(n.domain == ops.DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph)):
        model.opset_imports.pop(ops.DOMAIN, None)
    return ir.serde.serialize_model(model).SerializeToString()


def _rewrite(node, config: dict, opset: int) -> None:
    import onnx_ir as ir

    graph = node.graph
    name = node.name or node.outputs[0].name
    config = dict(config, node=name)
    inputs = list(node.inputs) + [None] * (len(_SIGNATURES[node.op_type]) - len(node.inputs))
    new_nodes = []

    def const(label, array):
        v = ir.Value(name=f"{name}.{label}", type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=f"{name}.{label}"))
        n = ir.node("Constant", [], attributes={"value": v.const_value}, name=f"{name}.{label}")
        n.outputs[0].name = v.name
        n.outputs[0].type, n.outputs[0].shape = v.type, v.shape
        new_nodes.append(n)
        return n.outputs[0]

    for i, (label, dtype) in enumerate(_SIGNATURES[node.op_type]):
        if inputs[i] is None:
            inputs[i] = const(f"absent_{label}", np.zeros((0,), dtype=dtype))
    if opset >= 13:  # the shape guard: Split with its sizes as an input
        inputs[0] = _guard(node, config, inputs[0], const, new_nodes)
    replacement = ir.node(CONTRIB_OPS[node.op_type], inputs, domain=CONTRIB_DOMAIN, name=node.name,
                          attributes={"config": json.dumps(config, sort_keys=True)},
                          num_outputs=len(node.outputs))
    graph.insert_before(node, new_nodes)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], node.outputs, replacement.outputs)


def _guard(node, config: dict, x, const, new_nodes):
    """x through ``Split(x, [expected], axis)`` with one output: the identity when the checked
    dimension (the last, or ConvLowBit's channels) is the expected one, else the run fails in this
    node, which is named after what is wrong (onnxruntime's Reshape fusion would rewrite a Reshape
    guard into one that checks nothing, so it is a Split)."""
    import onnx_ir as ir

    name = node.name or node.outputs[0].name
    op = node.op_type
    if op == "ConvLowBit":
        kh, kw = config["kernel_shape"]
        expected, axis = config["K"] // (kh * kw) * config["group"], 1
        what = f"input 'X' of {op} node '{name}' must be [B, C, H, W] with C = {expected}"
    else:
        expected, axis = (config["K"], -1) if op == "MatMulLowBit" else (config["size"], -1)
        what = f"input '{'A' if op == 'MatMulLowBit' else 'X'}' of {op} node '{name}' must end in {'K' if op == 'MatMulLowBit' else 'size'} = {expected}"
    split = ir.node("Split", [x, const("guard", np.array([expected], dtype=np.int64))], attributes={"axis": axis},
                    name=what, num_outputs=1)
    split.outputs[0].name = f"{name}.guarded"
    split.outputs[0].type = x.type
    new_nodes.append(split)
    return split.outputs[0]


_DECLARED = False
LAST_ERROR: str | None = None


def _none_if_empty(array: np.ndarray):
    return None if array.size == 0 and array.ndim == 1 else array


def _safely(fn, config_text: str, inputs: list[np.ndarray], shape_of) -> np.ndarray:
    """Run ``fn``; never raise into onnxruntime-extensions (that aborts the process)."""
    global LAST_ERROR
    config = {}
    try:
        config = json.loads(config_text)
        return fn(config, inputs)
    except Exception as exc:  # noqa: BLE001 - an exception here would abort the process
        LAST_ERROR = f"{config.get('node', '?')}: {exc}"
        print(f"lowbit reference op failed (output set to NaN): {LAST_ERROR}", file=sys.stderr)
        try:
            shape = shape_of(config, inputs)
        except Exception:  # noqa: BLE001
            shape = (0,)
        return np.full(shape, np.nan, dtype=_F32)


def _weights(config, inputs):
    w, scales, zp, levels, bias = inputs[1:6]
    keys = ("K", "N", "bits", "block_size", "format", "accuracy")
    return (w, scales, _none_if_empty(zp), _none_if_empty(levels), _none_if_empty(bias)), {k: config[k] for k in keys}


def _run_matmul(config, inputs):
    args, kwargs = _weights(config, inputs)
    return matmul_lowbit(inputs[0], *args, **kwargs)


def _run_conv(config, inputs):
    args, kwargs = _weights(config, inputs)
    conv = {k: config[k] for k in ("kernel_shape", "strides", "pads", "dilations", "group", "clip_min", "clip_max")}
    return conv_lowbit(inputs[0], *args, _none_if_empty(inputs[6]), **kwargs, **conv)


def _run_hadamard(config, inputs):
    return hadamard(inputs[0], size=config["size"], group=config["group"], order=config["order"], scale=config["scale"])


def _declare() -> None:
    """Declare the Python ops with onnxruntime-extensions, once per process."""
    global _DECLARED
    if _DECLARED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    types = {np.float32: PyCustomOpDef.dt_float, np.uint8: PyCustomOpDef.dt_uint8}
    shapes = {
        "MatMulLowBit": lambda c, i: (*i[0].shape[:-1], c["N"]),
        "ConvLowBit": lambda c, i: (i[0].shape[0], c["N"], 0, 0),
        "Hadamard": lambda c, i: i[0].shape,
    }
    runners = {"MatMulLowBit": _run_matmul, "ConvLowBit": _run_conv, "Hadamard": _run_hadamard}
    for op, contrib in CONTRIB_OPS.items():
        def body(*inputs, config, _run=runners[op], _shape=shapes[op]):
            return _safely(_run, config, list(inputs), _shape)

        onnx_op(op_type=contrib, inputs=[types[dtype] for _, dtype in _SIGNATURES[op]],
                outputs=[PyCustomOpDef.dt_float], attrs={"config": PyCustomOpDef.dt_string})(body)
    _DECLARED = True


def available() -> bool:
    """True when onnxruntime-extensions imports, so these ops can run inside onnxruntime."""
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError:
        return False
    return True


def library_path() -> str:
    from onnxruntime_extensions import get_library_path

    return get_library_path()


def register(session_options) -> None:
    """Register onnxruntime-extensions and lowbit's Python ops on ``session_options``."""
    _declare()
    try:
        if session_options.get_session_config_entry(_REGISTERED) == "1":
            return  # once per SessionOptions: onnxruntime refuses the same library twice
    except Exception:  # noqa: BLE001 - onnxruntime raises when the entry is absent
        pass
    session_options.register_custom_ops_library(library_path())
    session_options.add_session_config_entry(_REGISTERED, "1")


_REGISTERED = "lowbit.reference_registered"
