"""Uniform integer grids for weights, and the group layout every weight rounder shares.

A weight is handled as a canonical matrix ``W`` of shape [R, K]: R output rows, K reduction
columns. A *group map* ``groups`` (int array of length K) gives each column its group id in
0..G-1; every (row, group) pair has its own scale (and zero point). Per-channel is ``groups = 0``
(G = 1), blocks of B along K are ``np.arange(K) // B`` (see :func:`block_groups`; the last block
may be partial), any other map works too. Per-tensor quantization uses one scale for everything
(``scale`` of shape [1, 1]).

The algebra (s = scale, z = zero point, both per (row, group); b = bits)::

    q   = clamp(round_half_even(w / s) + z, qmin, qmax)        (ONNX QuantizeLinear)
    w^  = (q - z) * s                                          (ONNX DequantizeLinear, float32)

Symmetric grid (z = 0): codes are signed, the **full** two's-complement range
[-2^(b-1), 2^(b-1)-1] (4 bit: -8..7, 2 bit: -2..1). The scale is the smallest positive step for
which the group's range [min(w,0), max(w,0)] is not clipped::

    s = max(-min(w,0) / 2^(b-1),  max(w,0) / (2^(b-1)-1))

so when the most negative value is the extreme one, the -2^(b-1) code is used and the step is
absmax/2^(b-1); otherwise the step is absmax/(2^(b-1)-1) as in the "restricted" convention.
This step is never larger than absmax/(2^(b-1)-1) (the restricted convention), so without
clipping its error is never larger, and at 2 bits it keeps 4 levels instead of 3. Scales are
always positive (runtimes' QDQ fusions expect that). In ONNX the codes are int8/int4/int2 with
zero point 0, or uint4 with zero point 2^(b-1) for ``MatMulNBits``.

Asymmetric grid: unsigned codes [0, 2^b-1] with an integer zero point (uint8) in that range. As
in the GPTQ reference, the range is widened to include 0, so z = round(-min(w,0)/s) always lies
in the grid and no code is lost to an out-of-range zero point::

    s = (max(w,0) - min(w,0)) / (2^b - 1),   z = round(-min(w,0) / s)

Clipping with ratio c in (0, 1] multiplies the step: s_c = c * s. For the asymmetric grid the
zero point does not depend on c (z = round(-c*min / (c*s))), so clipping shrinks both ends of the
range toward zero by the same ratio. A group of all zeros gets s = 1 (any scale is exact).

Scales are stored as float32 (what ONNX holds) and codes are computed with the stored float32
scale, so :meth:`QuantizedWeight.dequantize` equals what onnxruntime computes, bit for bit. A grid
with ``half_scales`` rounds each scale to the nearest float16 first (still stored as float32; a
scale outside float16's normal range [2^-14, 65504] stays as it is): a relative change of at
most 2^-11, and lowbit's native kernels then keep the scales in half the bytes. A grid with
``byte_scales`` makes every block scale of a row a multiple of one step: s = step·q, q an integer
in [1, 255], step the row's largest scale / 255 with 11 significant bits, so that step·q is exact in
float32 (:func:`lowbit.quant.rtn.byte_round`); lowbit's AVX-512 and NEON kernels then keep a byte a
block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.core.errors import UserError

#: elements per row chunk in quantize_with (float64 temporaries of 512 KiB)
_ROW_CHUNK_ELEMENTS = 1 << 16

#: Weight bit widths lowbit rounds to.
SUPPORTED_BITS = (2, 3, 4, 8)


class QuantInputError(UserError, ValueError):
    """Bad input to the weight rounders (bits, group map, NaN/Inf weights, shapes).

    Both a :class:`~lowbit.core.errors.UserError` (the CLI reports it and exits 2) and a
    ``ValueError`` (what plain-numpy callers expect).
    """


@dataclass(frozen=True)
class Grid:
    """A uniform integer grid: ``bits`` in {2, 3, 4, 8}, signed symmetric or unsigned asymmetric."""

    bits: int
    symmetric: bool = True
    half_scales: bool = False
    byte_scales: bool = False

    def __post_init__(self):
        bits = self.bits
        if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
            raise QuantInputError(f"weight bits must be one of 2, 3, 4, 8; got {bits!r}")
        object.__setattr__(self, "bits", int(bits))
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise QuantInputError(f"Grid.symmetric must be True or False; got {self.symmetric!r}")
        object.__setattr__(self, "symmetric", bool(self.symmetric))
        object.__setattr__(self, "half_scales", bool(self.half_scales))
        object.__setattr__(self, "byte_scales", bool(self.byte_scales))
        if self.half_scales and self.byte_scales:
            raise QuantInputError("a Grid takes half_scales or byte_scales, not both")

    @property
    def qmin(self) -> int:
        """Smallest code: -2^(b-1) (symmetric) or 0 (asymmetric)."""
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: 2^(b-1)-1 (symmetric) or 2^b-1 (asymmetric)."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> np.dtype:
        """int8 for symmetric codes, uint8 for asymmetric codes (the narrowest numpy holder)."""
        return np.dtype(np.int8) if self.symmetric else np.dtype(np.uint8)

    def __str__(self) -> str:
        return f"{'s' if self.symmetric else 'u'}int{self.bits}[{self.qmin},{self.qmax}]"


def block_groups(K: int, block: int | None) -> np.ndarray:
    """Group map for blocks of ``block`` consecutive columns (the last may be partial).

    ``block=None`` (or ``block >= K``) gives per-channel: one group.
    """
    if block is None:
        return np.zeros(K, dtype=np.intp)
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise QuantInputError(f"block must be a positive integer; got {block!r}")
    return np.arange(K, dtype=np.intp) // int(block)


def check_weight(W, name: str = "weight") -> np.ndarray:
    """Return ``W`` as a float64 [R, K] array, refusing NaN/Inf, empty or non-2-D input by name."""
    arr = np.asarray(W)
    if arr.ndim != 2:
        raise QuantInputError(f"{name} must be a 2-D [rows, columns] matrix; got shape {arr.shape}")
    if arr.size == 0:
        raise QuantInputError(f"{name} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise QuantInputError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = arr[~finite]
        n_nan, n_inf = int(np.isnan(bad).sum()), int(np.isinf(bad).sum())
        r, k = np.argwhere(~finite)[0]
        raise QuantInputError(
            f"{name} contains {n_nan} NaN and {n_inf} Inf values (first at row {r}, column {k}); "
            "refusing to quantize it"
        )
    return arr


class GroupLayout:
    """The columns of each group gathered side by side: ``W[:, index]`` is [R, G, S].

    ``index`` [G, S] lists each group's columns (S = largest group size); shorter groups are
    padded by repeating their first column, and ``mask`` [G, S] is False on the padding. Padding
    with a real member keeps min/max exact; sums must use ``weight`` (mask as float) instead.
    """

    def __init__(self, groups, K: int, name: str = "group map"):
        g = np.asarray(groups)
        if g.shape != (K,):
            raise QuantInputError(f"{name} must have one entry per column ({K}); got shape {g.shape}")
        if not np.issubdtype(g.dtype, np.integer):
            if not (np.issubdtype(g.dtype, np.floating) and np.all(g == np.round(g))):
                raise QuantInputError(f"{name} must hold integer group ids; got dtype {g.dtype}")
        g = g.astype(np.intp)
        if g.min() < 0:
            raise QuantInputError(f"{name} holds a negative group id ({int(g.min())})")
        G = int(g.max()) + 1
        counts = np.bincount(g, minlength=G)
        if (counts == 0).any():
            empty = int(np.flatnonzero(counts == 0)[0])
            raise QuantInputError(f"{name} uses ids up to {G - 1} but group {empty} has no column")
        S = int(counts.max())
        order = np.argsort(g, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(K) - np.repeat(starts, counts)
        index = np.repeat(order[starts][:, None], S, axis=1)
        index[g[order], rank] = order
        mask = np.zeros((G, S), dtype=bool)
        mask[g[order], rank] = True
        self.groups, self.G, self.S, self.K = g, G, S, K
        self.counts, self.index, self.mask = counts, index, mask
        self.padded = not bool(mask.all())
        self.weight = mask.astype(np.float32) if self.padded else None
        # blocks of S in column order, K divisible by S: gather is a reshape (a view)
        self.contiguous = (not self.padded) and bool(np.array_equal(index.ravel(), np.arange(K)))

    def gather(self, W: np.ndarray) -> np.ndarray:
        """[R, K] → [R, G, S] (a view when groups are contiguous equal blocks)."""
        if self.contiguous:
            return W.reshape(W.shape[0], self.G, self.S)
        return W[:, self.index]


def base_params(Wg: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Unclipped step and zero point per group from min/max over the last axis.

    ``Wg`` is [..., S] (padding must repeat real members). Returns float64 ``s0`` [...] (> 0) and
    float64 integer-valued ``z`` [...] (0 for symmetric grids).
    """
    lo = np.minimum(Wg.min(axis=-1), 0.0).astype(np.float64)
    hi = np.maximum(Wg.max(axis=-1), 0.0).astype(np.float64)
    if grid.symmetric:
        s0 = np.maximum(-lo / float(-grid.qmin), hi / float(grid.qmax))
    else:
        s0 = (hi - lo) / float(grid.qmax)
    s0 = np.where(s0 > 0, s0, 1.0)
    if grid.symmetric:
        z = np.zeros_like(s0)
    else:
        z = np.clip(np.rint(-lo / s0), 0, grid.qmax)
    return s0, z


def half_rounded(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to the nearest float16 value (ties to even) where |x| lies in float16's
    normal range [2^-14, 65504], unchanged elsewhere — the rule of ``Grid.half_scales`` and of
    MatMulLowBit/ConvLowBit's int8 codebook scales (runtime/ops.py)."""
    x = np.asarray(x, dtype=np.float32)
    half = np.finfo(np.float16)
    magnitude = np.abs(x)
    in_range = (magnitude >= half.tiny) & (magnitude <= half.max)
    return np.where(in_range, x.astype(np.float16).astype(np.float32), x)


def truncated_11(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` with its mantissa cut to 11 significant bits (toward zero): the step of
    ``Grid.byte_scales``, whose products with integers up to 255 are then exact in float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return bits.view(np.float32)


def _as_scale(s0: np.ndarray, clip, grid: Grid) -> np.ndarray:
    clip = np.asarray(clip, dtype=np.float64)
    if np.any(~np.isfinite(clip)) or np.any(clip <= 0) or np.any(clip > 1):
        raise QuantInputError("clip ratios must lie in (0, 1]")
    scale = (s0 * clip).astype(np.float32)
    # a ratio that underflows float32 would give a zero scale; keep the smallest normal instead
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    return half_rounded(scale) if grid.half_scales else scale


def fit_scales(W, groups, grid: Grid, *, clip=1.0, per_tensor: bool = False, name: str = "weight"):
    """Min/max scales (and zero points) per (row, group), the range shrunk by ``clip``.

    ``clip`` is a ratio in (0, 1], a scalar or an array broadcastable to [R, G] ([1, 1] per
    tensor). Returns ``(scale, zero_point)``: float32 [R, G] (or [1, 1]) and uint8 of the same
    shape for asymmetric grids, None for symmetric ones.
    """
    W = check_weight(W, name)
    R, K = W.shape
    if per_tensor:
        s0, z = base_params(W.reshape(1, 1, R * K), grid)
    else:
        layout = GroupLayout(_default_groups(groups, K), K)
        s0, z = base_params(layout.gather(W), grid)
    scale = _as_scale(s0, np.broadcast_to(clip, s0.shape), grid)
    return scale, (None if grid.symmetric else z.astype(np.uint8))


def _default_groups(groups, K: int):
    return np.zeros(K, dtype=np.intp) if groups is None else groups


def _expand(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[R, G] per-group values → [R, K] (or [1, 1] stays broadcastable)."""
    values = np.asarray(values)
    if values.shape == (1, 1):
        return values
    return values[:, groups]


def quantize_with(W, scale, zero_point, groups, grid: Grid) -> np.ndarray:
    """Codes [R, K] (int8 symmetric / uint8 asymmetric) for given scales and zero points.

    ``scale`` [R, G] or [1, 1] is used as float32 (what is stored), the division in float64.
    """
    W = np.asarray(W)
    R, K = W.shape
    groups = np.asarray(_default_groups(groups, K), dtype=np.intp)
    scale = np.asarray(scale, dtype=np.float32)
    zp = None if zero_point is None else np.asarray(zero_point)
    codes = np.empty((R, K), dtype=grid.code_dtype)
    for r0, r1, pick in _row_chunks(R, K, scale):
        q = W[r0:r1].astype(np.float64)
        q /= _expand(pick(scale), groups)
        np.rint(q, out=q)
        if zp is not None:
            q += _expand(pick(zp), groups)
        np.clip(q, grid.qmin, grid.qmax, out=q)
        codes[r0:r1] = q
    return codes


def _row_chunks(R: int, K: int, scale: np.ndarray):
    """(r0, r1, pick) over row chunks of bounded size; ``pick`` slices per-row parameters
    (a per-tensor [1, 1] parameter applies to every chunk as it is)."""
    rows = max(1, _ROW_CHUNK_ELEMENTS // K)
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        yield r0, r1, (lambda a: a) if scale.shape == (1, 1) else (lambda a, r0=r0, r1=r1: a[r0:r1])


def dequantize(codes, scale, zero_point, groups) -> np.ndarray:
    """float32 ``(codes - zero_point) * scale``, computed as onnxruntime's DequantizeLinear does."""
    codes = np.asarray(codes)
    R, K = codes.shape
    groups = np.asarray(_default_groups(groups, K), dtype=np.intp)
    scale = np.asarray(scale, dtype=np.float32)
    zp = None if zero_point is None else np.asarray(zero_point)
    out = np.empty((R, K), dtype=np.float32)
    for r0, r1, pick in _row_chunks(R, K, scale):
        q = codes[r0:r1].astype(np.int32)
        if zp is not None:
            q -= _expand(pick(zp), groups)
        np.multiply(q, _expand(pick(scale), groups), out=out[r0:r1], dtype=np.float32, casting="unsafe")
    return out


@dataclass
class QuantizedWeight:
    """Integer codes on a uniform grid with per-(row, group) scales.

    ``codes`` [R, K] int8 (symmetric) or uint8 (asymmetric); ``scale`` float32 [R, G] or [1, 1]
    (per tensor); ``zero_point`` uint8 like ``scale`` for asymmetric grids, None for symmetric;
    ``groups`` the group map [K] (all zeros per tensor).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    groups: np.ndarray
    grid: Grid

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole matrix (also true of a one-row per-channel weight)."""
        return self.scale.shape == (1, 1)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> np.ndarray:
        """float32 [R, K]: ``(codes - zero_point) * scale``."""
        return dequantize(self.codes, self.scale, self.zero_point, self.groups)


def weight_sqnr(W, Wq) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σw² / Σ(w - w^)²), float64 sums.

    ``inf`` when the quantized weight is exact; ``-inf`` when W is all zeros but W^ is not.
    """
    W = np.asarray(W, dtype=np.float64)
    err = float(np.sum((W - np.asarray(Wq, dtype=np.float64)) ** 2))
    sig = float(np.sum(W * W))
    if err == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(sig / err))
