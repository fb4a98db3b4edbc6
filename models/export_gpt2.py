"""A tiny GPT-2 (seeded random init, ``transformers``) exported to ONNX, for rotation tests.

Run as ``python -m lowbit.models.export_gpt2 PATH``: writes the ONNX model to ``PATH`` and
prints its op histogram and the max relative error against torch. Nothing is downloaded: the
model is ``GPT2LMHeadModel(GPT2Config(...))`` with weights drawn from ``torch.manual_seed(seed)``,
so it is generated in the tests (``tests/conftest.py::gpt2_path``) and not committed, and it has
no entry in ``models/metrics.json``.

GPT-2 is a pre-norm transformer (LayerNorm ε 1e-5), 2 layers, width 128, 4 heads of 32,
GELU (tanh approximation, ``gelu_new``) MLP of 512, vocabulary 512, 64 positions::

    h = E_tok[ids] + E_pos[0..seq)
    per layer:  h = h + Wo · softmax(q·kᵀ/√32 + causal)·v + bo,  [q k v] = Wqkv · LN₁(h) + bqkv
                h = h + W2 · GELU_tanh(W1 · LN₂(h) + b1) + b2
    logits = E_tokᵀ · LN_f(h)        (lm_head tied to the token embedding, no bias)

Initialisation: ``transformers``' own (weights N(0, 0.02), biases 0), then made less
idealised so that passes folding the norms into the weights are exercised: every LayerNorm
gets γ = 1 + 0.2·N(0, 1), β = 0.1·N(0, 1), and every Conv1D bias 0.02·N(0, 1) (a zero bias
would also be dropped from its Gemm by ``clean_exported``).

Export: dynamo exporter, ``attn_implementation="eager"`` (attention as MatMul / Mul / Add /
Softmax / MatMul; "sdpa" adds NaN guards), ``optimize=False`` then lowbit's ``clean_exported``;
one input ``input_ids`` int64 [batch, seq] (positions derived inside), one output ``logits``
float32 [batch, seq, 512]; IR version 10, ai.onnx opset 21, weights inside the file. The graph:

- each Conv1D (weight stored [in, out]) is ``Reshape(x, [-1, in]) → Gemm(W, b) → Reshape`` back
  to [batch, seq, out]; c_attn is one Gemm [128, 384] followed by ``Split`` into q, k, v;
- heads: ``Reshape [batch, seq, 4, 32] → Transpose``; scores ``MatMul · 1/√32 + mask``;
- LayerNorm is one ``LayerNormalization`` node (5 of them: ln_1, ln_2 per layer and ln_f);
- the tied embedding is one initializer, ``lm_head.weight`` [512, 128]: ``Gather`` reads it for
  the token embedding and ``Transpose → MatMul`` for the logits (the constant folder does not
  fold a Transpose whose input has another user, as that would store the table twice);
- the causal mask comes from ``transformers.masking_utils`` (packed-sequence detection on the
  derived positions: CumSum / GatherND / Where, about 40 index nodes) as an additive
  [batch, 1, seq, seq] float mask of 0 / float32 min.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch

from lowbit.models import _export

VOCAB, N_POSITIONS, N_EMBD, N_LAYER, N_HEAD = 512, 64, 128, 2, 4
#: Spread of the random LayerNorm parameters: γ = 1 + GAMMA_STD·N(0,1), β = BETA_STD·N(0,1).
GAMMA_STD, BETA_STD = 0.2, 0.1
#: Spread of the random Conv1D biases (transformers initialises them to 0).
BIAS_STD = 0.02


def config():
    """The ``GPT2Config`` of the test model (eager attention, no cache, no dropout)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        use_cache=False,
        attn_implementation="eager",
    )


def build(seed: int = 0):
    """``GPT2LMHeadModel`` with seeded random weights (see module doc), in eval mode."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + GAMMA_STD * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(BETA_STD * torch.randn(module.bias.shape, generator=generator))
            elif type(module).__name__ == "Conv1D":
                module.bias.copy_(BIAS_STD * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    """The torch model's logits for int64 ``ids`` [batch, seq], float32 [batch, seq, vocab]."""
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))).logits.numpy()


def export(path: str | pathlib.Path, model=None):
    """Export ``model`` (default ``build()``) to ``path``; return the onnx_ir model.

    The ``transformers`` module is exported as it is (no wrapper): with ``use_cache=False`` its
    output flattens to the one tensor ``logits``, and its parameter names (``transformer.h.0.
    attn.c_attn.weight``, ``lm_head.weight``, ...) become the initializer names.
    """
    model = build() if model is None else model
    example = torch.zeros(2, 8, dtype=torch.int64)
    metadata = {
        "lowbit.model": "gpt2-tiny-random",
        "lowbit.postprocess": "none (next-token logits over the 512-token vocabulary)",
    }
    axes = {0: ("batch", 1024), 1: ("seq", N_POSITIONS)}
    return _export.export_torch(model, example, "input_ids", axes, pathlib.Path(path), metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", type=pathlib.Path, help="where to write the ONNX model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    args.path.parent.mkdir(parents=True, exist_ok=True)
    model = build(args.seed)
    exported = export(args.path, model=model)

    from lowbit.runtime.session import session

    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 16), dtype=np.int64)
    (got,) = session(args.path).run(["logits"], {"input_ids": ids})
    ref = reference_logits(model, ids)
    error = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(json.dumps({"onnx": str(args.path), "ops": _export.op_histogram(exported),
                      "max_rel_err_onnx_vs_torch": error}, indent=2))


if __name__ == "__main__":
    main()
