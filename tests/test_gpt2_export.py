"""The tiny GPT-2 test model (``lowbit.models.export_gpt2``): numbers and graph structure.

Needs torch and ``transformers`` (the ``models`` extra); the weights are a seeded random init,
nothing is downloaded. The model is exported once per session (``gpt2_path`` in conftest).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lowbit.core import io
from lowbit.runtime.session import session

pytest.importorskip("transformers")
export_gpt2 = pytest.importorskip("lowbit.models.export_gpt2")

#: max|onnx − torch| / max|torch| over the logits.
REL_TOL = 1e-4
D, LAYERS, VOCAB = export_gpt2.N_EMBD, export_gpt2.N_LAYER, export_gpt2.VOCAB


@pytest.fixture(scope="module")
def torch_gpt2():
    return export_gpt2.build()


@pytest.fixture(scope="module")
def gpt2_session(gpt2_path):
    return session(gpt2_path)


@pytest.fixture(scope="module")
def gpt2(gpt2_path):
    return io.load(gpt2_path)


def _initializer_users(model, name: str) -> list:
    return [node for node, _ in model.graph.initializers[name].uses()]


def test_gpt2_file_is_valid_capped_and_has_one_dynamic_input(gpt2_path):
    proto = onnx.load(gpt2_path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 10
    assert {imp.domain: imp.version for imp in proto.opset_import} == {"": 21}
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert {p.key: p.value for p in proto.metadata_props}["lowbit.model"] == "gpt2-tiny-random"
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = out.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "seq", VOCAB]
    # 2 MB: the weights once each (the tied embedding is not stored twice)
    assert gpt2_path.stat().st_size < 2.2e6


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 7), (3, 33), (1, export_gpt2.N_POSITIONS)])
def test_gpt2_onnx_logits_match_torch(gpt2_session, torch_gpt2, batch, seq):
    rng = np.random.default_rng(1000 * batch + seq)
    ids = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
    ref = export_gpt2.reference_logits(torch_gpt2, ids)
    (got,) = gpt2_session.run(["logits"], {"input_ids": ids})
    assert got.shape == ref.shape == (batch, seq, VOCAB) and got.dtype == np.float32
    assert np.abs(ref).max() > 0.1  # logits are not degenerate
    assert np.abs(got - ref).max() / np.abs(ref).max() < REL_TOL


def test_gpt2_layernorms_have_random_affine_parameters(gpt2):
    norms = [n for n in gpt2.graph if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * LAYERS + 1
    names = [n.inputs[1].name for n in norms]
    expected = [f"transformer.h.{i}.{ln}.weight" for i in range(LAYERS) for ln in ("ln_1", "ln_2")]
    assert names == [*expected, "transformer.ln_f.weight"]
    for node in norms:
        gamma, beta = (v.const_value.numpy() for v in node.inputs[1:3])
        assert gamma.shape == beta.shape == (D,)
        assert 0.1 < np.std(gamma - 1) < 0.3 and 0.05 < np.std(beta) < 0.15
        assert node.attributes["axis"].value == -1
        assert node.attributes["epsilon"].value == pytest.approx(1e-5)


def test_gpt2_graph_is_a_pre_norm_residual_stream(gpt2):
    """wte/wpe Gathers → Add → per layer [LN → … → Add] × 2 → ln_f → Transpose(wte) MatMul."""
    graph = gpt2.graph
    # token and position embeddings, summed
    (token,) = [n for n in _initializer_users(gpt2, "lm_head.weight") if n.op_type == "Gather"]
    (position,) = _initializer_users(gpt2, "transformer.wpe.weight")
    assert position.op_type == "Gather"
    assert graph.initializers["transformer.wpe.weight"].shape == (export_gpt2.N_POSITIONS, D)
    (embed_add,) = {n for n, _ in token.outputs[0].uses()} & {n for n, _ in position.outputs[0].uses()}
    assert embed_add.op_type == "Add"

    stream = embed_add.outputs[0]
    for i in range(LAYERS):
        for ln in ("ln_1", "ln_2"):
            users = {n.op_type: n for n, _ in stream.uses()}
            assert set(users) == {"LayerNormalization", "Add"}, (i, ln, users)
            assert users["LayerNormalization"].inputs[1].name == f"transformer.h.{i}.{ln}.weight"
            stream = users["Add"].outputs[0]
    (final_norm,) = [n for n, _ in stream.uses()]
    assert final_norm.inputs[1].name == "transformer.ln_f.weight"

    # every Linear (Conv1D) is a Gemm on an [in, out] weight with a bias
    gemms = [n for n in graph if n.op_type == "Gemm"]
    shapes = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]
    assert [tuple(n.inputs[1].shape) for n in gemms] == shapes * LAYERS
    assert all(n.inputs[2] is not None and n.inputs[2].name.endswith(".bias") for n in gemms)
    assert all(n.attributes.get_int("transB", 0) == 0 for n in gemms)
    # q, k, v: one Split of the fused c_attn output per layer; eager attention
    splits = [n for n in graph if n.op_type == "Split"]
    assert len(splits) == LAYERS and all(len(n.outputs) == 3 for n in splits)
    assert sum(n.op_type == "Softmax" for n in graph) == LAYERS
    assert sum(n.op_type == "Tanh" for n in graph) == LAYERS  # gelu_new

    # tied lm_head: the same table, transposed at run time, feeds the MatMul giving the logits
    (transpose,) = [n for n in _initializer_users(gpt2, "lm_head.weight") if n.op_type == "Transpose"]
    assert len(_initializer_users(gpt2, "lm_head.weight")) == 2
    (lm_head,) = [n for n, _ in transpose.outputs[0].uses()]
    assert lm_head.op_type == "MatMul" and lm_head.outputs[0] is graph.outputs[0]
    assert graph.initializers["lm_head.weight"].shape == (VOCAB, D)
