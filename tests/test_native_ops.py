"""lowbit's native ops inside onnxruntime: bad input named, and native == the numpy reference.

Every test runs through ``lowbit.runtime.session`` with the native library, which must be built
(``pip install -e .``): a missing library fails these tests instead of skipping them. The native
library is the one ``LOWBIT_OPS_LIBRARY`` names when it is set (the sanitizer run in
test_native_build.py runs this file against an ASan/UBSan build that way), and the instruction set
is capped by ``LOWBIT_ISA`` (``test_isa_path`` reruns this file with each path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.runtime import library, ops, reference
from lowbit.runtime.session import session

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers


def weight(rng, N, K, *, bits, block_size, format="uniform", zero_points=True):
    """Random packed inputs (W, scales, zero_points, levels) for a canonical W[N, K]; format
    "codebook_row" is a codebook with one table per row (levels [N, 1, 2^bits])."""
    blocks = ops.blocks(K, block_size)
    codes = rng.integers(0, 1 << bits, size=(N, K))
    W = reference.pack(codes, bits, block_size)
    scales = rng.uniform(0.01, 0.1, size=(N, blocks)).astype(np.float32)
    zp = levels = None
    if format == "uniform" and zero_points:
        zp = rng.integers(0, 1 << bits, size=(N, blocks)).astype(np.uint8)
    if format.startswith("codebook"):
        tables = 1 if format == "codebook_row" else blocks
        levels = np.sort(rng.normal(size=(N, tables, 1 << bits)), axis=-1).astype(np.float32)
    return W, scales, zp, levels


def model(op, activation, inputs, attrs, *, name="node", constant=True):
    """A one-node model: ``activation`` is the graph input; ``inputs`` (name → array or None for an
    absent optional input) become initializers, or graph inputs with ``constant=False``."""
    names = list(ops.HADAMARD_INPUTS if op == "Hadamard" else ops.MATMUL_INPUTS if op == "MatMulLowBit"
                 else ops.CONV_INPUTS)
    names = [n.rstrip("?") for n in names]
    node_inputs, graph_inputs, inits = [names[0]], [], []
    graph_inputs.append(helper.make_tensor_value_info(names[0], TensorProto.FLOAT, None))
    for n in names[1:]:
        value = inputs.get(n)
        if value is None:
            node_inputs.append("")
            continue
        node_inputs.append(n)
        if constant:
            inits.append(numpy_helper.from_array(value, n))
        else:
            graph_inputs.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(value.dtype), None))
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node(op, node_inputs, ["Y"], name=name, domain=ops.DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    m = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                               helper.make_opsetid(ops.DOMAIN, ops.VERSION)])
    return m.SerializeToString()


def native_session(model_bytes, threads=1):
    sess = session(model_bytes, threads=threads)
    assert sess.lowbit_implementation == "native", "lowbit's native library is not built: pip install -e ."
    return sess


def run(model_bytes, feeds, threads=1):
    return native_session(model_bytes, threads).run(None, feeds)[0]


def matmul_case(rng, *, M=3, K=75, N=9, bits=4, block_size=32, format="uniform", accuracy="float", bias=True,
                zero_points=True):
    W, scales, zp, levels = weight(rng, N, K, bits=bits, block_size=block_size, format=format, zero_points=zero_points)
    inputs = {"W": W, "scales": scales, "zero_points": zp, "levels": levels,
              "bias": rng.normal(size=N).astype(np.float32) if bias else None}
    attrs = dict(K=K, N=N, bits=bits, block_size=block_size, format=format.split("_")[0], accuracy=accuracy)
    A = rng.normal(size=(M, K) if isinstance(M, int) else (*M, K)).astype(np.float32)
    return A, inputs, attrs


def rel_err(y, ref):
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


def test_library_is_there():
    assert library.available(), "lowbit's native library is not built: pip install -e ."
    assert library.isa() in ("scalar", "avx2", "avx512vnni")


# ------------------------------------------------------------------------------------ bad input


def run_error(model_bytes, feeds, *, constant=True):
    with pytest.raises(Exception) as info:
        run(model_bytes, feeds)
    return str(info.value)


def test_wrong_packed_weight_length():
    rng = np.random.default_rng(0)
    A, inputs, attrs = matmul_case(rng)
    inputs["W"] = inputs["W"][:, :, :-1].copy()  # 15 bytes per block instead of 16
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="mm"), {"A": A})
    assert "MatMulLowBit node 'mm'" in message and "input 'W' has shape [9, 3, 15], expected [9, 3, 16]" in message


def test_wrong_packed_weight_length_non_constant():
    rng = np.random.default_rng(0)
    A, inputs, attrs = matmul_case(rng)
    inputs["W"] = inputs["W"][:-1].copy()
    feeds = {"A": A, **{k: v for k, v in inputs.items() if v is not None}}
    with pytest.raises(Exception) as info:
        run(model("MatMulLowBit", A, inputs, attrs, name="mm", constant=False), feeds)
    assert "MatMulLowBit node 'mm': input 'W' has shape [8, 3, 16], expected [9, 3, 16]" in str(info.value)


def test_scales_of_the_wrong_shape():
    rng = np.random.default_rng(1)
    A, inputs, attrs = matmul_case(rng)
    inputs["scales"] = inputs["scales"][:, :2].copy()
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="mm"), {"A": A})
    assert "MatMulLowBit node 'mm': input 'scales' has shape [9, 2], expected [9, 3]" in message


@pytest.mark.parametrize("op", ["MatMulLowBit", "ConvLowBit"])
def test_bits_3(op):
    rng = np.random.default_rng(2)
    A, inputs, attrs = matmul_case(rng, K=72)
    attrs["bits"] = 3
    extra = {"kernel_shape": [3, 3]} if op == "ConvLowBit" else {}
    with pytest.raises(Exception) as info:
        native_session(model(op, A, inputs, {**attrs, **extra}, name="q3"))
    assert f"{op} node 'q3': attribute 'bits' is 3, expected 2 or 4" in str(info.value)


def test_block_size_24():
    rng = np.random.default_rng(3)
    A, inputs, attrs = matmul_case(rng)
    attrs["block_size"] = 24
    with pytest.raises(Exception) as info:
        native_session(model("MatMulLowBit", A, inputs, attrs, name="b24"))
    assert "MatMulLowBit node 'b24': attribute 'block_size' is 24, expected 16, 32, 64, 128 or 256" in str(info.value)


def test_nan_scales():
    rng = np.random.default_rng(4)
    A, inputs, attrs = matmul_case(rng)
    inputs["scales"][4, 1] = np.nan
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="mm"), {"A": A})
    assert "MatMulLowBit node 'mm': input 'scales' holds a non-finite value (nan at row 4, block 1)" in message


def test_zero_point_too_large():
    rng = np.random.default_rng(5)
    A, inputs, attrs = matmul_case(rng, bits=2)
    inputs["zero_points"][2, 0] = 4
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="mm"), {"A": A})
    assert "MatMulLowBit node 'mm': input 'zero_points' holds 4 at row 2, block 0, expected a value < 2^bits = 4" in message


def test_levels_with_uniform_format():
    rng = np.random.default_rng(6)
    A, inputs, attrs = matmul_case(rng)
    inputs["levels"] = np.zeros((9, 3, 16), np.float32)
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="mm"), {"A": A})
    assert "MatMulLowBit node 'mm': input 'levels' is given but format is 'uniform'" in message


def test_levels_of_the_wrong_shape():
    rng = np.random.default_rng(12)
    A, inputs, attrs = matmul_case(rng, format="codebook")  # K = 75: 3 blocks of 32
    inputs["levels"] = inputs["levels"][:, :2]
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="cb"), {"A": A})
    assert "MatMulLowBit node 'cb': input 'levels' has shape [9, 2, 16], expected [9, 3, 16]" in message
    with pytest.raises(ValueError, match=r"input 'levels' has shape \[9, 2, 16\], expected \[9, 3, 16\]"):
        reference.matmul_lowbit(A, *(inputs[k] for k in ("W", "scales", "zero_points", "levels", "bias")), **attrs)


def test_codebook_without_levels():
    rng = np.random.default_rng(6)
    A, inputs, attrs = matmul_case(rng, format="codebook")
    inputs["levels"] = None
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="cb"), {"A": A})
    assert "MatMulLowBit node 'cb': input 'levels' is required with format 'codebook'" in message


def test_activation_of_the_wrong_width():
    rng = np.random.default_rng(7)
    A, inputs, attrs = matmul_case(rng)
    message = run_error(model("MatMulLowBit", A, inputs, attrs, name="mm"), {"A": A[:, :-1].copy()})
    assert "MatMulLowBit node 'mm': input 'A' has shape [3, 74], expected its last dimension to be K = 75" in message


def test_bad_format_and_k():
    rng = np.random.default_rng(8)
    A, inputs, attrs = matmul_case(rng)
    with pytest.raises(Exception) as info:
        native_session(model("MatMulLowBit", A, inputs, {**attrs, "format": "nf4"}, name="f"))
    assert "MatMulLowBit node 'f': attribute 'format' is 'nf4', expected one of 'uniform', 'codebook'" in str(info.value)
    with pytest.raises(Exception) as info:
        native_session(model("MatMulLowBit", A, inputs, {**attrs, "K": 0}, name="k"))
    assert "MatMulLowBit node 'k': attribute 'K' is 0, expected an int >= 1" in str(info.value)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)])
def test_empty_matmul(lead):
    rng = np.random.default_rng(9)
    A, inputs, attrs = matmul_case(rng, M=lead)
    y = run(model("MatMulLowBit", A, inputs, attrs), {"A": A})
    assert y.shape == (*lead, 9) and y.dtype == np.float32


def test_empty_conv_and_hadamard():
    rng = np.random.default_rng(10)
    W, scales, zp, _ = weight(rng, 4, 2 * 9, bits=4, block_size=16)
    X = np.zeros((0, 2, 5, 5), np.float32)
    attrs = dict(K=18, N=4, bits=4, block_size=16, kernel_shape=[3, 3])
    y = run(model("ConvLowBit", X, {"W": W, "scales": scales, "zero_points": zp}, attrs), {"X": X})
    assert y.shape == (0, 4, 3, 3)
    X = np.zeros((0, 3, 64), np.float32)
    assert run(model("Hadamard", X, {}, dict(size=64)), {"X": X}).shape == (0, 3, 64)


def test_conv_channel_mismatch():
    rng = np.random.default_rng(11)
    W, scales, zp, _ = weight(rng, 4, 2 * 9, bits=4, block_size=16)
    X = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    attrs = dict(K=18, N=4, bits=4, block_size=16, kernel_shape=[3, 3])
    message = run_error(model("ConvLowBit", X, {"W": W, "scales": scales, "zero_points": zp}, attrs, name="c"),
                        {"X": X})
    assert "ConvLowBit node 'c': input 'X' has 3 channels, expected 2" in message


def test_conv_bad_group():
    rng = np.random.default_rng(12)
    W, scales, zp, _ = weight(rng, 5, 2 * 9, bits=4, block_size=16)
    attrs = dict(K=18, N=5, bits=4, block_size=16, kernel_shape=[3, 3], group=2)
    with pytest.raises(Exception) as info:
        native_session(model("ConvLowBit", None, {"W": W, "scales": scales}, attrs, name="c"))
    assert "ConvLowBit node 'c': attribute 'N' = 5 is not divisible by 'group' = 2" in str(info.value)


def test_hadamard_bad_group():
    with pytest.raises(Exception) as info:
        native_session(model("Hadamard", None, {}, dict(size=96, group=24), name="h"))
    assert "Hadamard node 'h': attribute 'group' is 24, expected a power of two dividing size = 96" in str(info.value)
    with pytest.raises(Exception) as info:
        native_session(model("Hadamard", None, {}, dict(size=96, group=32, scale=float("inf")), name="h"))
    assert "Hadamard node 'h': attribute 'scale' is not finite" in str(info.value)
    X = np.zeros((2, 64), np.float32)
    message = run_error(model("Hadamard", X, {}, dict(size=96, group=32), name="h"), {"X": X})
    assert "Hadamard node 'h': input 'X' has shape [2, 64], expected its last dimension to be size = 96" in message


# ------------------------------------------------------------------------------------ native == reference


def _compare_matmul(rng, *, K, N, bits, block_size, format, accuracy, M=(2, 3), threads=1, constant=True):
    A, inputs, attrs = matmul_case(rng, M=M, K=K, N=N, bits=bits, block_size=block_size, format=format,
                                   accuracy=accuracy)
    feeds = {"A": A} if constant else {"A": A, **{k: v for k, v in inputs.items() if v is not None}}
    y = run(model("MatMulLowBit", A, inputs, attrs, constant=constant), feeds, threads=threads)
    args = [inputs[k] for k in ("W", "scales", "zero_points", "levels", "bias")]
    ref = reference.matmul_lowbit(A, *args, **attrs)
    assert y.shape == ref.shape == (*M, N)
    if accuracy == "float":
        assert rel_err(y, ref) <= 1e-5, rel_err(y, ref)
    else:
        exact = reference.matmul_lowbit(A, *args, **{**attrs, "accuracy": "float"})
        assert rel_err(y, exact) <= 2e-2, rel_err(y, exact)
        assert rel_err(y, ref) <= 1e-4, rel_err(y, ref)


@pytest.mark.parametrize("accuracy", ["float", "int8"])
@pytest.mark.parametrize("format", ["uniform", "codebook", "codebook_row"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("block_size", ops.BLOCK_SIZES)
def test_matmul_matches_reference(block_size, bits, format, accuracy):
    rng = np.random.default_rng(block_size * 10 + bits)
    K = 2 * block_size + 2 * bits + 1  # odd, the last block padded
    _compare_matmul(rng, K=K, N=13, bits=bits, block_size=block_size, format=format, accuracy=accuracy)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("constant", [True, False])
def test_matmul_threads_and_non_constant_weights(threads, constant):
    rng = np.random.default_rng(threads + 2 * constant)
    for accuracy in ("float", "int8"):
        for format in ("uniform", "codebook_row"):
            _compare_matmul(rng, K=333, N=257, bits=2, block_size=32, format=format, accuracy=accuracy, M=(5,),
                            threads=threads, constant=constant)


def test_matmul_without_zero_points_and_bias():
    rng = np.random.default_rng(21)
    A, inputs, attrs = matmul_case(rng, K=101, N=7, bits=4, block_size=16, bias=False, zero_points=False)
    y = run(model("MatMulLowBit", A, inputs, attrs), {"A": A})
    ref = reference.matmul_lowbit(A, inputs["W"], inputs["scales"], None, None, None, **attrs)
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("zero_points", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_matmul_half_scales_match_reference(bits, zero_points):
    """Scales that are exact halves (quantize's scales=auto) take the AVX-512 int8 kernel's half-scale
    storage (runtime/native/matmul_internal.h); its outputs are the reference's."""
    rng = np.random.default_rng(40 + bits + zero_points)
    for M, threads in (((1,), 1), ((5,), 2)):
        A, inputs, attrs = matmul_case(rng, M=M, K=517, N=40, bits=bits, block_size=32, accuracy="int8",
                                       zero_points=zero_points)
        inputs["scales"] = inputs["scales"].astype(np.float16).astype(np.float32)
        y = run(model("MatMulLowBit", A, inputs, attrs), {"A": A}, threads=threads)
        ref = reference.matmul_lowbit(A, *(inputs[k] for k in ("W", "scales", "zero_points", "levels", "bias")), **attrs)
        assert rel_err(y, ref) <= 1e-5, rel_err(y, ref)


CONV_CASES = [
    # B, C, H, W, N, (kh, kw), strides, pads, dilations, group, bits, block_size
    (1, 3, 9, 11, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, 16),
    (2, 4, 10, 9, 6, (3, 2), (2, 1), (0, 1, 2, 0), (1, 2), 2, 2, 32),
    (1, 8, 7, 7, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8, 4, 16),     # depthwise
    (1, 6, 8, 8, 12, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 6, 2, 16),    # depthwise, multiplier 2
    (1, 16, 5, 5, 7, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 4, 64),    # 1x1
    (1, 6, 12, 13, 9, (5, 5), (2, 3), (2, 2, 2, 2), (1, 1), 3, 4, 128),
    (1, 32, 6, 6, 3, (3, 3), (1, 1), (1, 0, 1, 0), (2, 2), 1, 2, 256),
]


@pytest.mark.parametrize("accuracy", ["float", "int8"])
@pytest.mark.parametrize("format", ["uniform", "codebook", "codebook_row"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{i}" for i in range(len(CONV_CASES))])
def test_conv_matches_reference(case, format, accuracy):
    B, C, H, W_, N, kernel, strides, pads, dilations, group, bits, block_size = case
    rng = np.random.default_rng(hash((C, N, group)) % 1000)
    K = C // group * kernel[0] * kernel[1]
    W, scales, zp, levels = weight(rng, N, K, bits=bits, block_size=block_size, format=format)
    bias = rng.normal(size=N).astype(np.float32)
    X = rng.normal(size=(B, C, H, W_)).astype(np.float32)
    attrs = dict(N=N, K=K, bits=bits, block_size=block_size, format=format.split("_")[0], accuracy=accuracy,
                 kernel_shape=list(kernel), strides=list(strides), pads=list(pads), dilations=list(dilations),
                 group=group)
    inputs = {"W": W, "scales": scales, "zero_points": zp, "levels": levels, "bias": bias}
    y = run(model("ConvLowBit", X, inputs, attrs), {"X": X}, threads=2)
    ref = reference.conv_lowbit(X, W, scales, zp, levels, bias, **attrs)
    assert y.shape == ref.shape
    if accuracy == "float":
        assert rel_err(y, ref) <= 1e-5, rel_err(y, ref)
    else:
        exact = reference.conv_lowbit(X, W, scales, zp, levels, bias, **{**attrs, "accuracy": "float"})
        assert rel_err(y, exact) <= 2e-2, rel_err(y, exact)
        assert rel_err(y, ref) <= 1e-4, rel_err(y, ref)


@pytest.mark.parametrize("clip", [(0.0, float("inf")), (0.0, 6.0), (-0.5, 0.25)])
def test_conv_fused_clamp_matches_reference(clip):
    """clip_min/clip_max (a fused Relu or ReLU6) clamp after the bias, native as the reference."""
    rng = np.random.default_rng(21)
    W, scales, zp, _ = weight(rng, 6, 4 * 9, bits=4, block_size=32)
    X = rng.normal(size=(1, 4, 7, 7)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    attrs = dict(N=6, K=36, bits=4, block_size=32, kernel_shape=[3, 3], pads=[1, 1, 1, 1], clip_min=clip[0], clip_max=clip[1])
    y = run(model("ConvLowBit", X, {"W": W, "scales": scales, "zero_points": zp, "bias": bias}, attrs), {"X": X})
    ref = reference.conv_lowbit(X, W, scales, zp, None, bias, **attrs)
    unclamped = reference.conv_lowbit(X, W, scales, zp, None, bias, **{**attrs, "clip_min": -np.inf, "clip_max": np.inf})
    assert rel_err(y, ref) <= 1e-5 and y.min() >= clip[0] and y.max() <= clip[1]
    assert 0 < np.mean(ref != unclamped) < 1  # the bounds cut some outputs and not others


def test_conv_clip_bounds_reversed():
    rng = np.random.default_rng(22)
    W, scales, _, _ = weight(rng, 4, 9, bits=4, block_size=16)
    attrs = dict(K=9, N=4, bits=4, block_size=16, kernel_shape=[3, 3], group=1, clip_min=1.0, clip_max=0.0)
    with pytest.raises(Exception) as info:
        native_session(model("ConvLowBit", None, {"W": W, "scales": scales}, attrs, name="c"))
    assert "ConvLowBit node 'c': attributes 'clip_min'" in str(info.value) and "clip_min <= clip_max" in str(info.value)


@pytest.mark.parametrize("order", ["natural", "sequency"])
@pytest.mark.parametrize("size,group,scale", [(16, None, None), (16, 4, None), (96, 32, None), (256, 256, None),
                                              (4096, 64, 0.5), (2, 1, None), (512, 2, 1.0)])
def test_hadamard_matches_reference(size, group, scale, order):
    rng = np.random.default_rng(size + (group or 0))
    X = rng.normal(size=(3, 5, size)).astype(np.float32)
    attrs = {"size": size, "order": order}
    if group is not None:
        attrs["group"] = group
    if scale is not None:
        attrs["scale"] = scale
    y = run(model("Hadamard", X, {}, attrs), {"X": X}, threads=2)
    ref = reference.hadamard(X, size=size, group=group, order=order, scale=scale)
    assert rel_err(y, ref) <= 1e-5, rel_err(y, ref)
    if scale is None:  # orthogonal: the norm of every row is kept
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(X, axis=-1), rtol=1e-5)


# ------------------------------------------------------------------------------------ every ISA path


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_isa_path(isa):
    """The whole file again with the kernels capped at ``isa`` (read once per process)."""
    env = {**os.environ, "LOWBIT_ISA": isa}
    probe = subprocess.run([sys.executable, "-c", "from lowbit.runtime import library; print(library.isa())"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    native = subprocess.run([sys.executable, "-c", "from lowbit.runtime import library; print(library.isa())"],
                            env={k: v for k, v in os.environ.items() if k != "LOWBIT_ISA"}, capture_output=True,
                            text=True, timeout=60).stdout.strip()
    order = ["scalar", "avx2", "avx512vnni"]
    assert probe.stdout.strip() == order[min(order.index(isa), order.index(native))]
    run_ = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
                           "-k", "not isa_path"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run_.returncode == 0, run_.stdout[-3000:] + run_.stderr[-2000:]
    assert " passed" in run_.stdout and " failed" not in run_.stdout


# ------------------------------------------------------------------------------------ conv: paths that read
# straight from the input planes (AVX-512: float depthwise 3×3 and 5×5 at stride 1 or 2, rows of 16-lane vectors
# plus a last ≤ 8 columns in ymm; int8 stride-1 convs with OW = W through masked loads; a 1-channel int8 conv as a
# dense one)

STRIDE1_CASES = [
    # C, H, W, N, (kh, kw), pads, dilations, group, accuracy
    (3, 5, 1, 3, (3, 3), (1, 1, 1, 1), (1, 1), 3, "float"),       # depthwise, W = 1
    (2, 2, 8, 4, (3, 3), (1, 1, 1, 1), (1, 1), 2, "float"),       # depthwise ×2, H = 2, 8 columns (ymm only)
    (4, 9, 24, 4, (3, 3), (0, 1, 2, 0), (1, 1), 4, "float"),      # depthwise, asymmetric pads, 16 + 8 columns
    (3, 11, 17, 3, (3, 3), (0, 0, 0, 0), (1, 1), 3, "float"),     # depthwise, no padding
    (2, 7, 70, 2, (3, 3), (2, 2, 2, 2), (1, 1), 2, "float"),      # depthwise, pads 2, 5 vectors a row
    (2, 13, 56, 2, (3, 3), (1, 1, 1, 1), (1, 1), 2, "float"),     # depthwise 56 wide
    (3, 7, 7, 3, (5, 5), (2, 2, 2, 2), (1, 1), 3, "float"),       # depthwise 5×5, 7×7 (EfficientNet's last stages)
    (2, 14, 30, 4, (5, 5), (2, 2, 2, 2), (1, 1), 2, "float"),     # depthwise 5×5 ×2, 16 + 14 columns
    (2, 4, 6, 2, (5, 5), (0, 1, 2, 0), (1, 1), 2, "float"),       # depthwise 5×5, asymmetric pads, H < 5
    (1, 8, 8, 16, (3, 3), (1, 1, 1, 1), (1, 1), 1, "int8"),       # 1 input channel
    (16, 8, 8, 32, (3, 3), (1, 1, 1, 1), (1, 1), 1, "int8"),      # OW = W, 8×8
    (16, 16, 20, 32, (3, 3), (1, 1, 1, 1), (1, 1), 1, "int8"),    # OW = W, enough work for several tasks
    (5, 9, 13, 12, (5, 5), (2, 2, 2, 2), (1, 1), 1, "int8"),      # 5×5, OW = W
    (4, 7, 10, 8, (3, 5), (0, 5, 2, 3), (1, 2), 2, "int8"),       # dilated, asymmetric pads, OW = W, groups
    (3, 6, 9, 4, (3, 3), (1, 2, 1, 2), (1, 1), 1, "int8"),        # OW = 11 > W: the padded copy
]

STRIDE2_CASES = [  # depthwise float, stride 2: even and odd input columns split in registers
    (4, 9, 24, 4, (3, 3), (0, 0, 1, 1), (1, 1), 4, "float"),      # EfficientNet's pads, 12 wide
    (2, 11, 70, 2, (3, 3), (1, 1, 1, 1), (1, 1), 2, "float"),     # 2 vectors + 3 columns in ymm
    (2, 6, 130, 2, (3, 3), (0, 0, 1, 1), (1, 1), 2, "float"),     # 4 vectors + 1 column
    (3, 7, 33, 3, (3, 3), (1, 0, 1, 0), (1, 1), 3, "float"),      # exactly 16 wide, no left pad
    (2, 5, 3, 2, (3, 3), (1, 1, 1, 1), (1, 1), 2, "float"),       # W = 3
    (3, 14, 14, 3, (5, 5), (1, 1, 2, 2), (1, 1), 3, "float"),     # 5×5, 7 wide (ymm only)
    (2, 13, 56, 4, (5, 5), (1, 1, 2, 2), (1, 1), 2, "float"),     # 5×5 ×2, 28 wide
    (3, 9, 40, 3, (5, 5), (2, 2, 2, 2), (1, 1), 3, "float"),      # 5×5, 16 + 4 columns
]


@pytest.mark.parametrize("case,stride", [(c, 1) for c in STRIDE1_CASES] + [(c, 2) for c in STRIDE2_CASES],
                         ids=[f"s1_{i}" for i in range(len(STRIDE1_CASES))] + [f"s2_{i}" for i in range(len(STRIDE2_CASES))])
def test_conv_planes_match_reference(case, stride):
    C, H, W_, N, kernel, pads, dilations, group, accuracy = case
    rng = np.random.default_rng(700 + C * H + W_)
    K = C // group * kernel[0] * kernel[1]
    for fmt, block_size, threads in (("uniform", 16, 1), ("codebook", 32, 2)):
        W, scales, zp, levels = weight(rng, N, K, bits=4, block_size=block_size, format=fmt)
        bias = rng.normal(size=N).astype(np.float32)
        X = rng.normal(size=(2, C, H, W_)).astype(np.float32)
        attrs = dict(N=N, K=K, bits=4, block_size=block_size, format=fmt, accuracy=accuracy,
                     kernel_shape=list(kernel), strides=[stride] * 2, pads=list(pads), dilations=list(dilations),
                     group=group)
        inputs = {"W": W, "scales": scales, "zero_points": zp, "levels": levels, "bias": bias}
        y = run(model("ConvLowBit", X, inputs, attrs), {"X": X}, threads=threads)
        ref = reference.conv_lowbit(X, W, scales, zp, levels, bias, **attrs)
        assert y.shape == ref.shape
        assert rel_err(y, ref) <= (1e-5 if accuracy == "float" else 1e-4), (fmt, rel_err(y, ref))


# ------------------------------------------------------------------------------------ conv: the residual input Z
# (a fused Add: Y = min(max((conv + bias) + Z, clip_min), clip_max), Z of exactly Y's shape, a run-time tensor)


def _z_model(inputs, attrs, *, name="node"):
    """``model(...)`` with Z a graph input (a run-time tensor, as after a fused Add) and the weights constant."""
    proto = onnx.ModelProto.FromString(model("ConvLowBit", None, inputs, attrs, name=name))
    z = next(t for t in proto.graph.initializer if t.name == "Z")
    proto.graph.initializer.remove(z)
    proto.graph.input.append(helper.make_tensor_value_info("Z", z.data_type, None))
    return proto.SerializeToString()


@pytest.mark.parametrize("accuracy", ["float", "int8"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("clip", [None, (0.0, float("inf")), (-0.5, 0.25)])
def test_conv_residual_z_matches_reference(clip, bias, accuracy):
    rng = np.random.default_rng(31)
    W, scales, zp, _ = weight(rng, 8, 6 * 9, bits=4, block_size=32)
    X = rng.normal(size=(2, 6, 7, 7)).astype(np.float32)
    Z = rng.normal(size=(2, 8, 7, 7)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32) if bias else None
    attrs = dict(N=8, K=54, bits=4, block_size=32, accuracy=accuracy, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    if clip is not None:
        attrs.update(clip_min=clip[0], clip_max=clip[1])
    for threads in (1, 2):
        y = run(_z_model({"W": W, "scales": scales, "zero_points": zp, "bias": b, "Z": Z}, attrs), {"X": X, "Z": Z},
                threads=threads)
        ref = reference.conv_lowbit(X, W, scales, zp, None, b, Z, **attrs)
        assert y.shape == ref.shape == (2, 8, 7, 7)
        assert rel_err(y, ref) <= (1e-5 if accuracy == "float" else 1e-4), rel_err(y, ref)
    # Z is added (before the clamp): without it the outputs are far from these
    without = reference.conv_lowbit(X, W, scales, zp, None, b, **attrs)
    assert rel_err(without, ref) > 0.1
    if clip is not None:
        assert y.min() >= clip[0] and y.max() <= clip[1] and 0 < np.mean(ref == np.float32(clip[0])) < 1


# every driver applies the epilogue to the outputs it wrote: each conv path, with Z and a clip
EPILOGUE_PATHS = {  # name: C, N, H, W, kernel, strides, pads, dilations, group
    "pointwise": (6, 8, 7, 9, 1, 1, 0, 1, 1),
    "stride2": (6, 8, 9, 9, 3, 2, 1, 1, 1),             # virtual pixels through a buffer
    "stride2_wide": (4, 8, 9, 40, 3, 2, 1, 1, 1),       # virtual pixels ≥ 16 a row
    "depthwise": (8, 8, 10, 20, 3, 1, 1, 1, 8),
    "depthwise_5x5_s2": (8, 16, 11, 11, 5, 2, 2, 1, 8),
    "depthwise_dilated": (8, 8, 10, 12, 3, 1, 2, 2, 8),  # the padded phase planes
}


@pytest.mark.parametrize("accuracy", ["float", "int8"])
@pytest.mark.parametrize("path", list(EPILOGUE_PATHS))
def test_conv_epilogue_on_every_path(path, accuracy):
    C, N, H, W_, k, stride, pad, dilation, group = EPILOGUE_PATHS[path]
    rng = np.random.default_rng(37)
    K = C // group * k * k
    W, scales, zp, _ = weight(rng, N, K, bits=4, block_size=16)
    X = rng.normal(size=(2, C, H, W_)).astype(np.float32)
    attrs = dict(N=N, K=K, bits=4, block_size=16, accuracy=accuracy, kernel_shape=[k, k], strides=[stride] * 2,
                 pads=[pad] * 4, dilations=[dilation] * 2, group=group, clip_min=-0.5, clip_max=0.25)
    b = rng.normal(size=N).astype(np.float32)
    ref0 = reference.conv_lowbit(X, W, scales, zp, None, b, **attrs)
    Z = rng.normal(size=ref0.shape).astype(np.float32)
    ref = reference.conv_lowbit(X, W, scales, zp, None, b, Z, **attrs)
    for threads in (1, 2):
        y = run(_z_model({"W": W, "scales": scales, "zero_points": zp, "bias": b, "Z": Z}, attrs), {"X": X, "Z": Z},
                threads=threads)
        assert y.shape == ref.shape
        assert rel_err(y, ref) <= (1e-5 if accuracy == "float" else 1e-4), rel_err(y, ref)
        y0 = run(model("ConvLowBit", X, {"W": W, "scales": scales, "zero_points": zp, "bias": b}, attrs), {"X": X},
                 threads=threads)
        assert rel_err(y0, ref0) <= (1e-5 if accuracy == "float" else 1e-4), rel_err(y0, ref0)
    # both bounds bind somewhere, and Z moves the outputs
    assert 0 < np.mean(ref == np.float32(-0.5)) < 1 and 0 < np.mean(ref == np.float32(0.25)) < 1
    assert rel_err(ref0, ref) > 0.1



def test_conv_residual_z_constant_and_depthwise_stride2():
    """Z as an initializer (read at run time all the same) on a depthwise stride-2 conv; OH ≠ H."""
    rng = np.random.default_rng(32)
    W, scales, zp, _ = weight(rng, 6, 9, bits=2, block_size=16)
    X = rng.normal(size=(2, 6, 9, 8)).astype(np.float32)
    Z = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
    attrs = dict(N=6, K=9, bits=2, block_size=16, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=6,
                 clip_min=0.0, clip_max=6.0)
    y = run(model("ConvLowBit", X, {"W": W, "scales": scales, "zero_points": zp, "Z": Z}, attrs), {"X": X}, threads=2)
    ref = reference.conv_lowbit(X, W, scales, zp, None, None, Z, **attrs)
    assert y.shape == (2, 6, 5, 4) and rel_err(y, ref) <= 1e-5, rel_err(y, ref)


def test_conv_residual_z_of_the_wrong_shape_or_type():
    rng = np.random.default_rng(33)
    W, scales, zp, _ = weight(rng, 4, 2 * 9, bits=4, block_size=16)
    X = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    attrs = dict(K=18, N=4, bits=4, block_size=16, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    m = _z_model({"W": W, "scales": scales, "zero_points": zp, "Z": np.zeros((2, 4, 6, 6), np.float32)}, attrs, name="c")
    assert run(m, {"X": X, "Z": np.zeros((2, 4, 6, 6), np.float32)}).shape == (2, 4, 6, 6)
    for shape in ((1, 4, 6, 6), (2, 4, 6), (2, 4, 1, 1), (2, 1, 6, 6)):  # never broadcast
        message = run_error(m, {"X": X, "Z": np.zeros(shape, np.float32)})
        assert (f"ConvLowBit node 'c': input 'Z' has shape {list(shape)}, expected [2, 4, 6, 6] "
                "(Y's shape [B, N, OH, OW])") in message, message
    # another element type: onnxruntime refuses the model against the op's declared float32 input Z
    m = _z_model({"W": W, "scales": scales, "zero_points": zp, "Z": np.zeros((2, 4, 6, 6), np.float64)}, attrs, name="c")
    with pytest.raises(Exception) as info:
        run(m, {"X": X, "Z": np.zeros((2, 4, 6, 6), np.float64)})
    assert "tensor(double)" in str(info.value) and "(Z)" in str(info.value) and "ConvLowBit" in str(info.value)


def test_conv_residual_z_empty_batch():
    rng = np.random.default_rng(34)
    W, scales, zp, _ = weight(rng, 4, 2 * 9, bits=4, block_size=16)
    attrs = dict(K=18, N=4, bits=4, block_size=16, kernel_shape=[3, 3])
    m = _z_model({"W": W, "scales": scales, "zero_points": zp, "Z": np.zeros((0, 4, 3, 3), np.float32)}, attrs, name="c")
    X = np.zeros((0, 2, 5, 5), np.float32)
    assert run(m, {"X": X, "Z": np.zeros((0, 4, 3, 3), np.float32)}).shape == (0, 4, 3, 3)
    assert "input 'Z' has shape [0, 4, 3, 2]" in run_error(m, {"X": X, "Z": np.zeros((0, 4, 3, 2), np.float32)})
