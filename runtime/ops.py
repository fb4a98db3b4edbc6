"""The schemas of lowbit's own operators (domain ``lowbit``, version 1) — the one place they are defined.

The native library (``runtime/native``), the numpy reference (:mod:`lowbit.runtime.reference`),
the ``lower`` pass and the tests all follow this text. Every op computes in float32 and returns
float32.

Packed low-bit weights (MatMulLowBit, ConvLowBit)
-------------------------------------------------
A weight is its canonical matrix W[N, K]: N output rows, K reduction columns (for a Conv,
N = output channels and K = (C / group)·kh·kw in im2col order c·kh·kw + ky·kw + kx — the OIHW
kernel reshaped to [N, K]). Columns are cut into ``blocks = ceil(K / block_size)`` blocks of
``block_size`` consecutive columns; the last block is padded to a whole block (padding rule: the
padded columns hold any code and are never read — they multiply nothing).

``W``  uint8 ``[N, blocks, block_size·bits/8]`` — the same layout as ``com.microsoft.MatMulNBits``'s
       B: unsigned codes in 0 … 2^bits − 1, packed little-end first (code j of a byte in bits
       j·bits … j·bits + bits − 1), so code of column k of row n is in byte
       ``(k mod block_size)·bits / 8`` of block ``k // block_size``.
``scales``  float32 ``[N, blocks]``, finite (a NaN or infinite scale is an error).
``zero_points``  uint8 ``[N, blocks]``, one unpacked byte per block, each < 2^bits; optional;
       ``format=uniform`` only. Absent: every zero point is 2^(bits−1) (a symmetric grid).
``levels``  float32 ``[N, blocks, 2^bits]`` (a table per block) or ``[N, 1, 2^bits]`` (one table
       per row, which every block of the row scales by its ``scales``: the codebook then streams
       the bytes of the uniform format); required for ``format=codebook``, refused otherwise.
       Below, ``levels[n, b]`` of a ``[N, 1, 2^bits]`` table is ``levels[n, 0]``.

Decoded weight (the reference's exact float32 arithmetic)::

    uniform:   Ŵ[n, k] = (code[n, k] − zero_point[n, b]) · scales[n, b]          b = k // block_size
    codebook:  Ŵ[n, k] = levels[n, b, code[n, k]] · scales[n, b]

``accuracy`` chooses the arithmetic of the dot products:

- ``float`` (default): y = Σ_k a_k · Ŵ[n, k] in float32 (summation order free).
- ``int8``: activations are quantized per block of K on the fly, for each row of A separately::

      amax = max_k∈block |a_k|;  q_k = rint(a_k · (127 / amax))  (float32; q = 0 when amax = 0)
      y = Σ_b  (amax / 127) · scales[n, b] · Σ_k∈b q_k · w_int[n, k]

  with integer weights ``w_int = code − zero_point`` (uniform: exact) or, for a codebook,
  ``w_int = rint(levels[n, b, code] · 127 / lmax)`` and the block's scale multiplied by
  ``lmax / 127`` and rounded to the nearest float16 value when it lies in float16's normal range
  [2^-14, 65504] (a relative change ≤ 2^-11, far below the table's own rounding; the kernels then
  keep it in 2 bytes), lmax = max |levels[n, b, :]| (one int8 table per block, or per row). ``rint`` rounds
  half to even. This is what onnxruntime's MatMulNBits does at accuracy_level 4, and what VNNI
  runs fast.

MatMulLowBit
------------
``Y = MatMulLowBit(A, W, scales, zero_points?, levels?, bias?)``

- A float32 [..., K] (any rank ≥ 1; the leading dimensions may be 0: the output is then empty);
  Y float32 [..., N] = A · Ŵᵀ (+ bias).
- bias float32 [N], optional.
- attributes: ``K`` (int ≥ 1), ``N`` (int ≥ 1), ``bits`` ∈ {2, 4}, ``block_size`` ∈ {16, 32, 64,
  128, 256}, ``format`` ∈ {"uniform", "codebook"} (default "uniform"), ``accuracy`` ∈ {"float",
  "int8"} (default "float").

ConvLowBit
----------
``Y = ConvLowBit(X, W, scales, zero_points?, levels?, bias?, Z?)`` — a 2-D convolution, NCHW.

- X float32 [B, C, H, W]; Y float32 [B, N, OH, OW]; W/scales/zero_points/levels packed as above
  with N = output channels and K = (C / group)·kh·kw; bias float32 [N].
- Z float32, optional, exactly Y's shape [B, N, OH, OW] (no broadcasting): a residual added after
  the bias and before the clamp, Y = min(max((conv + bias) + Z, clip_min), clip_max) — a following
  ``Add`` fused in, as onnxruntime's FusedConv takes it. Z is a run-time tensor, never prepacked.
- attributes: ``N``, ``K``, ``bits``, ``block_size``, ``format``, ``accuracy`` as MatMulLowBit;
  ``kernel_shape`` [kh, kw] (required), ``strides`` [sh, sw] (default 1, 1), ``pads``
  [top, left, bottom, right] (default 0s; explicit pads only — the lower pass resolves
  ``auto_pad``), ``dilations`` [dh, dw] (default 1, 1), ``group`` (default 1; C and N divisible
  by it; group = C = N is depthwise), ``clip_min`` / ``clip_max`` (floats, default −∞ / +∞:
  Y = min(max(conv + bias + Z, clip_min), clip_max) — a following Relu (0, +∞) or Clip/ReLU6
  (0, 6) fused in, after the residual Z when there is one; clip_min ≤ clip_max).
  OH = ⌊(H + top + bottom − dh·(kh − 1) − 1) / sh⌋ + 1, likewise OW, as ONNX Conv.

Hadamard
--------
``Y = Hadamard(X)`` along the last axis: X float32 [..., size] → Y float32 [..., size].

- attributes: ``size`` (int, required, = the last dimension), ``group`` (default ``size``; a power
  of two dividing ``size``), ``order`` ∈ {"natural", "sequency"} (default "natural"), ``scale``
  (float, default 1/√group).
- Y[..., g·group + i] = scale · Σ_j H[i, j] · X[..., g·group + j] for each block g, where H is the
  group×group Walsh–Hadamard matrix in the given row order: natural (Sylvester) order
  H[i, j] = (−1)^popcount(i & j); sequency order puts the rows by their number of sign changes —
  row i of the sequency-ordered matrix is natural row ``bitreverse(i ^ (i >> 1))`` (the Gray
  code of i, bit-reversed over log2(group) bits). With the default scale the op is orthogonal;
  natural order is symmetric (its own inverse), sequency order's inverse is its transpose.
- Cost O(size · log2 group) per row (the fast Walsh–Hadamard transform).

Errors
------
Bad attributes fail when the session is created; inputs of the wrong type, shape or length, NaN
scales, zero points ≥ 2^bits and a ``levels`` input with ``format=uniform`` fail the run; both as
onnxruntime errors naming the node and the input or attribute, never a crash.
"""

from __future__ import annotations

DOMAIN = "lowbit"
VERSION = 1

BITS = (2, 4)
BLOCK_SIZES = (16, 32, 64, 128, 256)
FORMATS = ("uniform", "codebook")
ACCURACIES = ("float", "int8")
ORDERS = ("natural", "sequency")

#: input names in order; a trailing ``?`` marks an optional input
MATMUL_INPUTS = ("A", "W", "scales", "zero_points?", "levels?", "bias?")
CONV_INPUTS = ("X", "W", "scales", "zero_points?", "levels?", "bias?", "Z?")
HADAMARD_INPUTS = ("X",)


def blocks(k: int, block_size: int) -> int:
    """Blocks per row: ceil(K / block_size)."""
    return -(-k // block_size)


def bytes_per_block(block_size: int, bits: int) -> int:
    return block_size * bits // 8


def packed_shape(n: int, k: int, bits: int, block_size: int) -> tuple[int, int, int]:
    """The shape of the packed ``W`` input."""
    return (n, blocks(k, block_size), bytes_per_block(block_size, bits))


def sequency_permutation(group: int) -> list[int]:
    """perm[i] = the natural-order row that is row i in sequency order."""
    bits = group.bit_length() - 1
    out = []
    for i in range(group):
        gray = i ^ (i >> 1)
        out.append(int(format(gray, f"0{bits}b")[::-1], 2) if bits else 0)
    return out
