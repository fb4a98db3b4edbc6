"""Tests of lowbit's embedded reference models, their data and the synthetic graph builders.

No torch here: the committed ONNX files are measured with onnxruntime and compared with the
numbers the training scripts recorded in ``models/metrics.json``; the synthetic graphs are
checked with ``onnx.checker`` and compared against float64 numpy references of their algebra.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lowbit.models import data, evaluate, synthetic

MODELS_DIR = pathlib.Path(data.__file__).resolve().parent
DIGITS = MODELS_DIR / "digits_cnn.onnx"
LLAMA = MODELS_DIR / "tiny_llama.onnx"
METRICS = json.loads((MODELS_DIR / "metrics.json").read_text())
MAX_FILE_BYTES = 5 * 1024 * 1024


def _session(model) -> ort.InferenceSession:
    return evaluate.open_session(model)


@pytest.fixture(scope="module")
def digits_session():
    return _session(DIGITS)


@pytest.fixture(scope="module")
def llama_session():
    return _session(LLAMA)


def _op_types(path: pathlib.Path) -> list[str]:
    return [node.op_type for node in ir.load(path).graph]


# --- committed model files -----------------------------------------------------------------


@pytest.mark.parametrize("path", [DIGITS, LLAMA], ids=lambda p: p.name)
def test_model_file_is_small_valid_and_capped(path):
    assert path.stat().st_size < MAX_FILE_BYTES
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 10
    opsets = {imp.domain: imp.version for imp in proto.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) <= 21
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    key = path.stem
    assert metadata["lowbit.model"] == key
    assert metadata["lowbit.metric"] == METRICS[key]["metric"]
    assert METRICS[key]["file_bytes"] == path.stat().st_size
    for tensor in proto.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        assert np.all(np.isfinite(array)), tensor.name


def test_metrics_record_how_models_were_made():
    assert METRICS["digits_cnn"]["training"]["seed"] == 0
    assert METRICS["tiny_llama"]["training"]["seed"] == 0
    assert METRICS["digits_cnn"]["training"]["torch"].startswith("2.")
    assert 30_000 < METRICS["digits_cnn"]["parameters"] < 100_000
    assert 0.7e6 < METRICS["tiny_llama"]["parameters"] < 1.3e6
    for key, path in (("digits_cnn", DIGITS), ("tiny_llama", LLAMA)):
        assert METRICS[key]["op_histogram"] == dict(sorted(_histogram(path).items()))


def _histogram(path: pathlib.Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in _op_types(path):
        counts[op] = counts.get(op, 0) + 1
    return counts


# --- digits CNN ------------------------------------------------------------------------------


def test_digits_data_contract():
    x_test, y_test = data.digits_eval_set()
    assert x_test.dtype == np.float32 and x_test.shape == (540, 1, 8, 8)
    assert y_test.dtype == np.int64 and y_test.shape == (540,)
    assert x_test.min() == 0.0 and x_test.max() == 1.0
    assert np.array_equal(np.bincount(y_test), [54, 55, 53, 55, 54, 55, 54, 54, 52, 54])
    calib = data.digits_calib(16)
    assert calib.shape == (16, 1, 8, 8) and calib.dtype == np.float32
    assert np.array_equal(calib, data.digits_calib(256)[:16])
    with pytest.raises(ValueError, match="digits_calib"):
        data.digits_calib(257)


def test_digits_split_matches_sklearn():
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split

    digits = datasets.load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16.0))[:, None]
    x_train, x_test, _, y_test = train_test_split(
        images, digits.target.astype(np.int64), stratify=digits.target, **data.DIGITS_SPLIT
    )
    stored_x, stored_y = data.digits_eval_set()
    assert np.array_equal(stored_x, x_test) and np.array_equal(stored_y, y_test)
    assert np.array_equal(data.digits_calib(256), x_train[:256])


def test_digits_graph_keeps_batchnorm():
    ops = _op_types(DIGITS)
    assert ops.count("BatchNormalization") == 5
    assert ops.count("Conv") == 5
    assert "Add" in ops  # the residual join


def test_digits_top1_matches_metrics(digits_session):
    top1 = evaluate.digits_top1(digits_session)
    assert top1 >= 0.95
    assert abs(top1 - METRICS["digits_cnn"]["top1"]) <= 1e-6
    assert evaluate.digits_top1(DIGITS) == top1  # path and session agree


def test_digits_dynamic_batch(digits_session):
    x_test, _ = data.digits_eval_set()
    (one,) = digits_session.run(["logits"], {"input": x_test[:1]})
    (many,) = digits_session.run(["logits"], {"input": x_test[:7]})
    assert one.shape == (1, 10) and many.shape == (7, 10)
    assert np.max(np.abs(one[0] - many[0])) < 1e-5


# --- tiny llama ------------------------------------------------------------------------------


def test_text_split_contract():
    corpus = data.text_corpus()
    train, heldout = data.text_split()
    assert train + heldout == corpus
    assert len(heldout) == int(len(corpus) * 0.1)
    assert data.text_corpus() == corpus and corpus.decode("utf-8")


def test_llama_bits_per_byte_matches_metrics(llama_session):
    record = METRICS["tiny_llama"]
    bpb = evaluate.llama_bits_per_byte(llama_session)
    assert record["bits_per_byte_max_bytes"] == evaluate.DEFAULT_MAX_BYTES
    assert bpb <= record["bits_per_byte"] + 0.01
    assert abs(bpb - record["bits_per_byte"]) < 1e-4  # deterministic evaluation
    assert bpb < 3.0  # a uniform guess is 8 bits; an untrained model is near that
    # The onnxruntime export agrees with the torch model the script measured.
    assert abs(bpb - record["bits_per_byte_torch"]) < 1e-3


def test_llama_io_and_causality(llama_session):
    inputs, outputs = llama_session.get_inputs(), llama_session.get_outputs()
    assert [i.name for i in inputs] == ["tokens"] and inputs[0].type == "tensor(int64)"
    assert [o.name for o in outputs] == ["logits"] and outputs[0].type == "tensor(float)"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(3, 128), dtype=np.int64)
    (full,) = llama_session.run(["logits"], {"tokens": tokens})
    assert full.shape == (3, 128, 256) and full.dtype == np.float32
    # Position t sees only tokens 0..t: a prefix run and a run with a changed tail agree on it.
    (prefix,) = llama_session.run(["logits"], {"tokens": tokens[:1, :40]})
    changed = tokens[:1].copy()
    changed[:, 40:] = rng.integers(0, 256, size=(1, 88))
    (other,) = llama_session.run(["logits"], {"tokens": changed})
    assert np.max(np.abs(prefix[0] - full[0, :40])) < 1e-4
    assert np.max(np.abs(other[0, :40] - full[0, :40])) < 1e-4
    assert np.max(np.abs(other[0, 40:] - full[0, 40:])) > 1e-2
    (single,) = llama_session.run(["logits"], {"tokens": tokens[:2, :1]})
    assert single.shape == (2, 1, 256)


def test_llama_rmsnorm_form_is_recorded():
    ops = _op_types(LLAMA)
    form = METRICS["tiny_llama"]["rmsnorm_form"]
    n_norms = 2 * METRICS["tiny_llama"]["architecture"]["layers"] + 1
    if form.startswith("RMSNormalization"):
        assert ops.count("RMSNormalization") == n_norms
    else:
        assert form.startswith("decomposed")
        for op in ("Pow", "ReduceMean", "Sqrt"):
            assert ops.count(op) == n_norms
    assert ops.count("Softmax") == METRICS["tiny_llama"]["architecture"]["layers"]


def test_llama_eval_rejects_too_few_bytes(llama_session):
    with pytest.raises(ValueError, match="max_bytes"):
        evaluate.llama_bits_per_byte(llama_session, max_bytes=100)


# --- synthetic graphs: numpy references in float64 -----------------------------------------


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: value.const_value.numpy().astype(np.float64)
        for name, value in model.graph.initializers.items()
    }


def _conv(x, w, b=None, group=1):
    """NCHW convolution, stride 1, 'same' zero padding, weight [Cout, Cin/group, k, k]."""
    n, c, h, width = x.shape
    cout, cpg, k, _ = w.shape
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    xg = xp.reshape(n, group, cpg, h + 2 * pad, width + 2 * pad)
    wg = w.reshape(group, cout // group, cpg, k, k)
    out = np.zeros((n, group, cout // group, h, width))
    for i in range(k):
        for j in range(k):
            out += np.einsum("ngchw,goc->ngohw", xg[..., i : i + h, j : j + width], wg[..., i, j])
    out = out.reshape(n, cout, h, width)
    return out if b is None else out + b[None, :, None, None]


def _bn(x, p, name, eps=1e-5):
    shape = (1, -1, 1, 1)
    inv = p[f"{name}.scale"] / np.sqrt(p[f"{name}.var"] + eps)
    return (x - p[f"{name}.mean"].reshape(shape)) * inv.reshape(shape) + p[f"{name}.bias"].reshape(
        shape
    )


def _relu(x):
    return np.maximum(x, 0.0)


def _resnet_reference(p, x):
    s = _relu(_bn(_conv(x, p["stem.conv.weight"], p["stem.conv.bias"]), p, "stem.bn"))
    h = _relu(_bn(_conv(s, p["block.conv1.weight"]), p, "block.bn1"))
    h = _bn(_conv(h, p["block.conv2.weight"], p["block.conv2.bias"]), p, "block.bn2")
    return _relu(s + h)


def _mobilenet_reference(p, x):
    hidden = p["expand.conv.weight"].shape[0]
    h = np.clip(_bn(_conv(x, p["expand.conv.weight"]), p, "expand.bn"), 0, 6)
    h = np.clip(_bn(_conv(h, p["dw.conv.weight"], group=hidden), p, "dw.bn", eps=1e-3), 0, 6)
    return x + _bn(_conv(h, p["project.conv.weight"]), p, "project.bn")


def _layernorm(x, p, name, eps=1e-12):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p[f"{name}.scale"] + p[f"{name}.bias"]


def _transformer_reference(p, x, heads=4):
    from math import erf

    n, s, d = x.shape
    hd = d // heads

    def lin(v, name):
        return v @ p[f"{name}.weight"] + p[f"{name}.bias"]

    def split(v):
        return v.reshape(n, s, heads, hd).transpose(0, 2, 1, 3)

    q, k, v = (split(lin(x, f"attn.{name}")) for name in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, d)
    h = _layernorm(x + lin(context, "attn.out"), p, "attn.norm")
    u = lin(h, "mlp.fc1")
    gelu = u * (1.0 + np.vectorize(erf)(u / math.sqrt(2.0))) / 2.0
    return _layernorm(h + lin(gelu, "mlp.fc2"), p, "mlp.norm")


BUILDERS = {
    "resnet_block": (synthetic.resnet_block, _resnet_reference),
    "mobilenet_block": (synthetic.mobilenet_block, _mobilenet_reference),
    "transformer_encoder_block": (synthetic.transformer_encoder_block, _transformer_reference),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_synthetic_checks_and_matches_numpy(kind):
    build, reference = BUILDERS[kind]
    model = build(seed=3)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 10 and proto.opset_import[0].version == 21
    session = _session(proto.SerializeToString())
    (inp,) = session.get_inputs()
    shape = [2 if isinstance(dim, str) or dim is None else dim for dim in inp.shape]
    x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    (got,) = session.run(None, {inp.name: x})
    want = reference(_weights(model), x.astype(np.float64))
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) < 1e-4
    assert np.std(want) > 0.1  # the reference is not degenerate


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_synthetic_is_seeded(kind):
    build, _ = BUILDERS[kind]
    first = ir.to_proto(build(seed=5)).SerializeToString()
    again = ir.to_proto(build(seed=5)).SerializeToString()
    other = ir.to_proto(build(seed=6)).SerializeToString()
    assert first == again
    assert first != other


@pytest.mark.parametrize("kind", ["resnet_block", "mobilenet_block"])
def test_synthetic_batchnorm_stats_are_nontrivial(kind):
    build, _ = BUILDERS[kind]
    model = build(seed=0)
    bns = [node for node in model.graph if node.op_type == "BatchNormalization"]
    assert len(bns) == 3
    for node in bns:
        scale, bias, mean, var = (v.const_value.numpy() for v in node.inputs[1:])
        assert np.min(np.abs(scale - 1.0)) > 0 and np.any(scale < 0)
        assert np.std(bias) > 0.05 and np.std(mean) > 0.05
        assert np.all(var > 0.4) and np.std(var) > 0.1


def test_synthetic_rejects_bad_options():
    with pytest.raises(ValueError, match="heads"):
        synthetic.transformer_encoder_block(d=30, heads=4)
    with pytest.raises(ValueError, match="channels"):
        synthetic.resnet_block(channels=0)
