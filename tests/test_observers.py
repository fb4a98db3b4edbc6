"""Activation observers: streamed dyadic histograms, minmax/percentile/entropy/mse ranges, qparams."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.core.errors import UserError
from lowbit.quant.observers import (
    DTYPES,
    METHODS,
    CalibrationError,
    Observer,
    ObserverSet,
    qparams_from_range,
)

N = 1 << 20          # samples per distribution
OUTLIERS = 2         # "rare": 2 in 2^20 (≈ 2e-6 of the data)
FACTOR = 8.0         # outlier magnitude, in units of the largest |value| of the bulk
KINDS = ("gaussian", "laplacian", "uniform", "relu")


def fake_quant(x: np.ndarray, scale, zero: int, dtype: str) -> np.ndarray:
    """ONNX QuantizeLinear then DequantizeLinear, in float32 like onnxruntime."""
    qmin, qmax, _ = DTYPES[dtype]
    q = np.clip(np.rint(x / np.float32(scale)) + zero, qmin, qmax)
    return ((q - zero) * np.float32(scale)).astype(np.float32)


def bulk_mse(obs: Observer, bulk: np.ndarray, method: str, dtype: str, symmetric: bool) -> float:
    scale, zero = obs.qparams(method, dtype=dtype, symmetric=symmetric)
    return float(np.mean((fake_quant(bulk, scale, zero, dtype) - bulk) ** 2.0))


def make(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(data, bulk): the bulk distribution with OUTLIERS values replaced by ±FACTOR·max|bulk|."""
    rng = np.random.default_rng(seed)
    draw = {
        "gaussian": lambda: rng.standard_normal(N),
        "laplacian": lambda: rng.laplace(size=N),
        "uniform": lambda: rng.uniform(-1.0, 1.0, N),
        "relu": lambda: np.maximum(rng.standard_normal(N), 0.0),
    }[kind]
    bulk = draw().astype(np.float32)
    where = rng.choice(N, OUTLIERS, replace=False)
    signs = np.ones(OUTLIERS) if kind == "relu" else np.resize([1.0, -1.0], OUTLIERS)
    data = bulk.copy()
    data[where] = (FACTOR * np.abs(bulk).max() * signs).astype(np.float32)
    keep = np.ones(N, bool)
    keep[where] = False
    return data, bulk[keep]


@pytest.fixture(scope="module", params=KINDS)
def dist(request):
    data, bulk = make(request.param)
    obs = Observer(request.param)
    obs.update(data)
    return request.param, data, bulk, obs


# Bulk-MSE ratios minmax / method, measured with these seeds (uint8 asymmetric, int8 symmetric):
#   gaussian   percentile 93 / 94   entropy 25 / 25   mse 13.6 / 13.9
#   laplacian  percentile 125 / 127 entropy 57 / 57   mse 13.3 / 13.4
#   uniform    percentile 64 / 64   entropy 64 / 64   mse 13.6 / 13.9
#   relu       percentile 50 / 87   entropy 25 / 70   mse 1.8 / 5.6
# The asserted floors leave about 25% margin. mse minimises the error of *all* samples, outliers
# included, so it clips them only as far as their squared clipping error stays below the rounding
# error saved on the bulk (that is why it clips less than the others, and least for one-sided
# 8-bit data, where the rounding noise per step is smallest).
MIN_RATIO = {
    ("gaussian", False): {"percentile": 70, "entropy": 18, "mse": 10},
    ("gaussian", True): {"percentile": 70, "entropy": 18, "mse": 10},
    ("laplacian", False): {"percentile": 90, "entropy": 40, "mse": 10},
    ("laplacian", True): {"percentile": 90, "entropy": 40, "mse": 10},
    ("uniform", False): {"percentile": 48, "entropy": 48, "mse": 10},
    ("uniform", True): {"percentile": 48, "entropy": 48, "mse": 10},
    ("relu", False): {"percentile": 37, "entropy": 18, "mse": 1.4},
    ("relu", True): {"percentile": 65, "entropy": 50, "mse": 4.2},
}


@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", True)])
def test_minmax_covers_outliers_others_clip_them_and_beat_minmax_on_the_bulk(dist, dtype, symmetric):
    kind, data, bulk, obs = dist
    lo, hi = obs.compute_range("minmax", symmetric=symmetric)
    assert lo <= data.min() and hi >= data.max()
    outlier = float(np.abs(data).max())
    base = bulk_mse(obs, bulk, "minmax", dtype, symmetric)
    for method, floor in MIN_RATIO[(kind, symmetric)].items():
        lo, hi = obs.compute_range(method, symmetric=symmetric)
        assert max(-lo, hi) < 0.8 * outlier, (method, lo, hi)          # the outliers are clipped
        assert lo <= 0.0 <= hi
        if kind == "relu" and not symmetric:
            assert lo == 0.0                                            # one-sided: [0, T]
        ratio = base / bulk_mse(obs, bulk, method, dtype, symmetric)
        assert ratio >= floor, (method, ratio)


def test_percentile_is_the_data_quantile_within_one_bin(dist):
    kind, data, _, obs = dist
    w = obs.bin_width
    lo, hi = obs.compute_range("percentile", percentile=99.9)
    if kind == "relu":                                                  # upper tail only
        assert lo == 0.0
        assert abs(hi - np.quantile(data, 0.999)) <= w
    else:                                                               # 0.05% cut on each side
        assert abs(lo - np.quantile(data, 0.0005)) <= w
        assert abs(hi - np.quantile(data, 0.9995)) <= w
    _, t = obs.compute_range("percentile", percentile=99.9, symmetric=True)
    assert abs(t - np.quantile(np.abs(data), 0.999)) <= w


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_50_batches_equals_one_shot(kind):
    data, _ = make(kind, seed=1)
    data = data[: N // 4]
    one = Observer(kind)
    one.update(data)
    streamed = Observer(kind)
    # ascending |value| order makes the range grow in nearly every batch: the hardest case
    order = np.argsort(np.abs(data), kind="stable")
    for batch in np.array_split(data[order], 50):
        streamed.update(batch.reshape(-1, 5) if batch.size % 5 == 0 else batch)
    assert streamed.count == one.count == data.size
    assert (streamed.min, streamed.max) == (one.min, one.max) == (float(data.min()), float(data.max()))
    assert streamed.bin_width == one.bin_width
    np.testing.assert_array_equal(streamed.histogram()[0].sum(), data.size)
    c1, e1 = one.histogram()
    cs, es = streamed.histogram()
    assert np.array_equal(c1[c1 > 0], cs[cs > 0])                       # identical counts, bin by bin
    assert np.array_equal(e1[:-1][c1 > 0], es[:-1][cs > 0])
    w = one.bin_width
    for method in METHODS:
        for symmetric in (False, True):
            a = one.compute_range(method, symmetric=symmetric)
            b = streamed.compute_range(method, symmetric=symmetric)
            assert abs(a[0] - b[0]) <= w and abs(a[1] - b[1]) <= w, (method, a, b)
            assert a == b                                               # in fact: exactly equal


def test_histogram_matches_numpy_on_its_final_grid_after_growing_range():
    """Batches of growing scale (and drifting offset): min, max, total and every count are exact."""
    rng = np.random.default_rng(3)
    obs = Observer("growing")
    batches = [(rng.standard_normal(4096) * 1.3**k + 0.5 * k).astype(np.float32) for k in range(60)]
    for b in batches:
        obs.update(b)
    everything = np.concatenate(batches)
    assert obs.min == float(everything.min()) and obs.max == float(everything.max())
    assert obs.count == everything.size == obs.counts.sum()
    counts, edges = obs.histogram()
    assert edges[0] <= everything.min() and edges[-1] > everything.max()
    np.testing.assert_array_equal(counts, np.histogram(everything, bins=edges)[0])
    assert obs.bin_width == 2.0 ** round(math.log2(obs.bin_width))      # dyadic
    occupied = np.flatnonzero(counts)
    assert occupied[-1] - occupied[0] + 1 > obs.bins // 2 - 1          # resolution: > B/2 − 1 bins used


def test_histogram_size_fixed_after_1000_updates():
    rng = np.random.default_rng(4)
    obs = Observer("t", bins=2048)
    shape, nbytes = obs.counts.shape, obs.counts.nbytes
    total = 0
    for k in range(1000):
        b = (rng.standard_normal(97) * 1.01**k).astype(np.float32)
        if k % 7 == 0:
            b[0] = 10.0 * 1.01**k                                       # the range keeps growing
        obs.update(b)
        total += b.size
        assert obs.counts.shape == shape == (2048,) and obs.counts.nbytes == nbytes == 2048 * 8
    assert obs.count == total == obs.counts.sum()


def test_streaming_memory_is_bounded():
    """200 batches of 64k floats (51 MB streamed): peak < 2 MB above the reused batch buffer."""
    rng = np.random.default_rng(5)
    batch = np.empty(1 << 16, dtype=np.float32)
    rng.standard_normal(out=batch, dtype=np.float32)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        obs = Observer("stream")
        for k in range(200):
            rng.standard_normal(out=batch, dtype=np.float32)
            batch *= np.float32(1.02**k)                                # growing range → re-binning
            obs.update(batch)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert obs.count == 200 * batch.size
    assert peak < 2 * 2**20, peak
    assert peak < 600 * 2**10, peak                                     # measured ≈ 450 kB


def _qdq_session(dtype: str, scale, zero: int):
    """x → QuantizeLinear → DequantizeLinear in onnxruntime (opset 21: 8- and 16-bit codes)."""
    import onnxruntime as ort

    x = ir.Value(name="x", shape=ir.Shape(["n"]), type=ir.TensorType(ir.DataType.FLOAT))
    s = ir.Value(name="s", const_value=ir.tensor(np.array(scale, np.float32), name="s"))
    z = ir.Value(name="z", const_value=ir.tensor(np.array(zero, np.dtype(dtype)), name="z"))
    s.dtype, s.shape = ir.DataType.FLOAT, ir.Shape([])
    z.dtype, z.shape = z.const_value.dtype, ir.Shape([])
    q = ir.node("QuantizeLinear", [x, s, z], name="q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name="dq")
    dq.outputs[0].name, dq.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = ir.Shape(["n"])
    graph = ir.Graph([x], [dq.outputs[0]], nodes=[q, dq], initializers=[s, z], opset_imports={"": 21})
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


CASES = {
    "gaussian": np.random.default_rng(6).standard_normal(5000).astype(np.float32) * 3 + 1,
    "relu": np.maximum(np.random.default_rng(7).standard_normal(5000), 0).astype(np.float32),
    "negative": -np.random.default_rng(8).uniform(0.5, 2.0, 5000).astype(np.float32),
    "all-zero": np.zeros((4, 8), np.float32),
    "constant": np.full(100, 3.25, np.float32),
    "constant-negative": np.full(100, -0.75, np.float32),
    "one-value": np.array([1e-3], np.float32),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_qparams_valid_for_quantizelinear(case, dtype):
    data = CASES[case]
    obs = Observer(case)
    obs.update(data)
    qmin, qmax, bits = DTYPES[dtype]
    for symmetric in (False, True):
        sess = None
        for method in METHODS:
            scale, zero = obs.qparams(method, dtype=dtype, symmetric=symmetric)
            assert isinstance(scale, np.float32) and type(zero) is int
            assert np.isfinite(scale) and scale > 0
            assert qmin <= zero <= qmax
            if symmetric:
                assert zero == (0 if qmin < 0 else 2 ** (bits - 1))
            assert fake_quant(np.zeros(1, np.float32), scale, zero, dtype)[0] == 0.0   # 0 exact
            if method == "minmax":
                err = np.abs(fake_quant(data, scale, zero, dtype) - data).max()
                assert err <= 0.505 * scale          # nothing clipped (0.5%: float32 x/scale at 16 bit)
                if not np.any(data):
                    assert scale == 1.0
                sess = _qdq_session(dtype, scale, zero)
                y = sess.run(None, {"x": data.reshape(-1)})[0]
                np.testing.assert_array_equal(y, fake_quant(data.reshape(-1), scale, zero, dtype))


def test_qparams_algebra():
    assert qparams_from_range(-1.0, 3.0, "uint8") == (np.float32(4 / 255), 64)
    assert qparams_from_range(0.0, 2.55, "uint8") == (np.float32(0.01), 0)
    assert qparams_from_range(0.0, 2.55, "int8") == (np.float32(0.01), -128)
    assert qparams_from_range(-2.0, 1.0, "int8", symmetric=True) == (np.float32(2 / 127), 0)
    assert qparams_from_range(-2.0, 1.0, "uint8", symmetric=True) == (np.float32(2 / 127), 128)
    assert qparams_from_range(1.0, 2.0, "int16") == (np.float32(2 / 65535), -32768)   # widened to 0
    assert qparams_from_range(-4.0, 0.0, "uint16") == (np.float32(4 / 65535), 65535)
    assert qparams_from_range(0.0, 0.0, "int16", symmetric=True) == (np.float32(1.0), 0)
    scale, zero = qparams_from_range(0.0, 1e-42, "uint8")
    assert scale == np.finfo(np.float32).tiny and zero == 0


def test_16_bit_activations():
    data, bulk = make("gaussian", seed=9)
    obs = Observer("a16")
    obs.update(data)
    for dtype in ("uint16", "int16"):
        scale, zero = obs.qparams("minmax", dtype=dtype)
        assert scale == np.float32((obs.max - obs.min) / 65535)
        err16 = np.mean((fake_quant(bulk, scale, zero, dtype) - bulk) ** 2)
        err8 = bulk_mse(obs, bulk, "minmax", "uint8", False)
        assert 0.8 * 257**2 < err8 / err16 < 1.2 * 257**2                 # (65535/255)² finer
        scale, zero = obs.qparams("minmax", dtype=dtype, symmetric=True)
        assert scale == np.float32(max(-obs.min, obs.max) / 32767)
    # entropy at 16 bits: 2^15 levels exceed the histogram's bins, so nothing is clipped
    assert obs.compute_range("entropy", bits=16) == (obs.min, obs.max)
    # mse at 16 bits: rounding noise is 66000× smaller, so the two outliers are no longer worth
    # clipping, unlike at 8 bits
    lo16, hi16 = obs.compute_range("mse", bits=16)
    lo8, hi8 = obs.compute_range("mse", bits=8)
    assert hi16 > 0.95 * obs.max and lo16 < 0.95 * obs.min
    assert hi8 < 0.5 * obs.max


def test_mse_range_is_near_the_brute_force_optimum():
    rng = np.random.default_rng(10)
    data = np.concatenate([rng.standard_normal(100_000), rng.exponential(3.0, 30_000)]).astype(np.float32)
    obs = Observer("skewed")
    obs.update(data)

    def true_mse(lo, hi, symmetric):
        scale, zero = qparams_from_range(lo, hi, "uint8", symmetric=symmetric)
        return float(np.mean((fake_quant(data, scale, zero, "uint8") - data) ** 2))

    # symmetric: a 1-D search over T
    t_grid = np.linspace(1.0, float(np.abs(data).max()), 300)
    best_sym = min(true_mse(-t, t, True) for t in t_grid)
    lo, hi = obs.compute_range("mse", symmetric=True)
    assert true_mse(lo, hi, True) <= 1.01 * best_sym                    # measured 1.0003
    # asymmetric: a 2-D search over (lo, hi)
    los, his = np.linspace(data.min(), -1.0, 30), np.linspace(2.0, data.max(), 60)
    best = min(true_mse(a, b, False) for a in los for b in his)
    err = true_mse(*obs.compute_range("mse"), False)
    assert err <= 1.01 * best                                           # measured 0.999
    # on its own objective (error over all the data) mse beats the other methods
    assert err < 0.9 * true_mse(*obs.compute_range("minmax"), False)   # measured 0.84
    for method in ("percentile", "entropy"):
        assert err < 0.8 * true_mse(*obs.compute_range(method), False)  # measured 0.69


def test_entropy_ignores_exact_zeros_and_follows_tensorrt_levels():
    rng = np.random.default_rng(11)
    positive = np.abs(rng.standard_normal(100_000)).astype(np.float32)
    a, b = Observer("a"), Observer("b")
    a.update(positive)
    b.update(positive)
    b.update(np.zeros(300_000, np.float32))                            # a ReLU's exact zeros
    assert b.zeros == 300_000 and a.zeros == 0
    assert a.compute_range("entropy") == b.compute_range("entropy")
    assert a.compute_range("entropy", symmetric=True) == b.compute_range("entropy", symmetric=True)
    # the threshold is at least L bins: L = 2^b one-sided, 2^(b−1) per side symmetric
    w = a.bin_width
    assert a.compute_range("entropy")[1] >= min(256 * w, a.max)
    assert a.compute_range("entropy", symmetric=True)[1] >= min(128 * w, a.max)
    # 8-bit KL on a half-normal keeps most of the tail: between 2.5σ and the maximum
    assert 2.5 <= a.compute_range("entropy")[1] <= a.max


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_is_refused_naming_the_tensor(bad):
    obs = Observer("conv1.output")
    obs.update(np.ones(10, np.float32))
    x = np.ones((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"calibration tensor 'conv1\.output' contains 1 (NaN|Inf)"):
        obs.update(x)
    assert obs.count == 10 and obs.counts.sum() == 10                  # the bad batch left no trace
    with pytest.raises(UserError, match="'relu_out'"):
        ObserverSet().update({"relu_out": np.array([1.0, np.nan], np.float32)})


def test_bad_options_and_no_data_are_named():
    obs = Observer("t")
    with pytest.raises(CalibrationError, match="'t' received no data"):
        obs.compute_range("minmax")
    obs.update(np.arange(10, dtype=np.float32))
    with pytest.raises(CalibrationError, match="method 'entrpy'.*did you mean 'entropy'"):
        obs.compute_range("entrpy")
    with pytest.raises(CalibrationError, match="dtype 'unit8'.*did you mean 'uint8'"):
        obs.qparams("minmax", dtype="unit8")
    with pytest.raises(CalibrationError, match="bits=1"):
        obs.compute_range("mse", bits=1)
    with pytest.raises(CalibrationError, match="percentile=0"):
        obs.compute_range("percentile", percentile=0)
    with pytest.raises(CalibrationError, match="bins=8"):
        Observer("t", bins=8)
    with pytest.raises(CalibrationError, match="'t' has dtype complex64"):
        obs.update(np.ones(3, np.complex64))


def test_observer_set():
    rng = np.random.default_rng(12)
    feeds = [{"a": rng.standard_normal((4, 8)).astype(np.float32),
              "b": np.maximum(rng.standard_normal(16), 0).astype(np.float32),
              "c": rng.standard_normal(3).astype(np.float32)} for _ in range(5)]
    every = ObserverSet()
    chosen = ObserverSet(["a", "b"], bins=512)
    for feed in feeds:
        every.update(feed)
        chosen.update(feed)
    assert sorted(every) == ["a", "b", "c"] and sorted(chosen) == ["a", "b"] and len(chosen) == 2
    assert chosen["a"].bins == 512 and chosen["b"].count == 5 * 16
    qp = every.qparams_all("minmax", "uint8")
    a = np.concatenate([f["a"].ravel() for f in feeds])
    assert qp["a"] == qparams_from_range(a.min(), a.max(), "uint8")
    assert qp["b"][1] == 0                                               # post-ReLU: zero point 0
    assert every.ranges_all("percentile", symmetric=True)["c"][0] < 0
    assert set(every.qparams_all("entropy", "int8")) == {"a", "b", "c"}
    with pytest.raises(CalibrationError, match="'x' received no data"):
        ObserverSet(["x"]).qparams_all("mse", "int8")
