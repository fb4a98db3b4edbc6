"""Small synthetic ONNX graphs for unit tests, built with plain ``onnx_ir``.

Each builder takes a ``seed`` and returns an ``onnx_ir.Model`` (IR version 10, ai.onnx opset 21)
that passes ``onnx.checker`` with ``full_check=True`` and runs in onnxruntime. Same arguments and
seed give a byte-identical serialized model; another seed gives other weights. Every value,
node and initializer has a stable name so tests can look weights up.

Weights are random but well scaled (He/Glorot normal), and every BatchNormalization carries
non-trivial statistics — γ ∈ ±[0.5, 1.5] (a quarter of the channels negative), β ~ N(0, 0.2²),
μ ~ N(0, 0.3²), σ² ∈ [0.5, 2] — so that folding ``BN(Conv(x))`` into one Conv,
``W' = W·γ/√(σ²+ε)``, ``b' = (b−μ)·γ/√(σ²+ε) + β``, is tested for real.

Builders (all inputs float32, batch dimension symbolic ``batch``):

``resnet_block(channels=16, size=8, in_channels=3, seed=0)``
    input ``input`` [batch, in_channels, size, size] → output ``output`` [batch, C, size, size]::

        s = Relu(BN0(Conv_stem(x) + b_stem))                     3x3, in_channels → C
        y = Relu(s + BN2(Conv2(Relu(BN1(Conv1(s)))) + b2))       3x3, C → C; Conv1 has no bias

``mobilenet_block(channels=16, expand=4, size=8, seed=0)``
    input ``input`` [batch, C, size, size] → output ``output`` (same shape), inverted residual::

        e = Clip(BN1(Conv_expand(x)), 0, 6)           1x1, C → C·expand
        d = Clip(BN2(Conv_dw(e)), 0, 6)               3x3 depthwise, group = C·expand
        y = x + BN3(Conv_project(d))                  1x1, C·expand → C

``transformer_encoder_block(d=64, heads=4, seq=16, mlp=4·d, seed=0)``
    input ``input`` [batch, seq, d] → output ``output`` [batch, seq, d], post-norm (BERT)::

        q, k, v = x·Wq + bq, x·Wk + bk, x·Wv + bv          split into heads of d/heads
        a = Softmax(q·kᵀ / √(d/heads)) · v                  heads merged back to d
        h = LayerNorm(x + a·Wo + bo)
        y = LayerNorm(h + GELU(h·W1 + b1)·W2 + b2),  GELU(u) = u·(1 + erf(u/√2))/2

    Matrices are stored [in, out] for ``MatMul``; LayerNorm has random γ, β and ε = 1e-12.

``vgg_stack(channels=(64, 128, 128, 256, 256), size=56, seed=0)``
    input ``input`` [batch, channels[0], size, size] → output ``output``
    [batch, channels[-1], size, size], a plain VGG stage (no pooling, no BN)::

        h_0 = x,  h_i = Relu(Conv_i(h_{i−1}) + b_i)        3x3, pad 1, channels[i−1] → channels[i]

    Nodes ``conv{i}`` (weights ``conv{i}.weight``, ``conv{i}.bias``) and ``relu{i}``, i = 1…;
    the default is 3.47 G multiply-accumulates per image, the size of VGG-16's 56×56 stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["OPSET", "IR_VERSION", "mobilenet_block", "resnet_block", "transformer_encoder_block", "vgg_stack"]

OPSET = 21
IR_VERSION = 10
_FLOAT = ir.DataType.FLOAT


class _Builder:
    """Records named nodes and seeded initializers on an ``onnx_ir`` tape."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.tape = ir.tape.Tape()
        self.seed = seed

    # -- values -------------------------------------------------------------------------------
    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name))

    def weight(self, name: str, shape: Sequence[int], std: float) -> ir.Value:
        array = self.rng.normal(0.0, std, size=tuple(shape))
        return self.const(name, array.astype(np.float32))

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], name: str, **attributes):
        """Add one node named ``name`` whose single output value is also named ``name``."""
        return self.tape.op(
            op_type, inputs, attributes or None, name=name, output=ir.Value(name=name)
        )

    # -- layers -------------------------------------------------------------------------------
    def conv(
        self,
        x: ir.Value,
        name: str,
        cin: int,
        cout: int,
        kernel: int,
        *,
        group: int = 1,
        bias: bool = False,
    ) -> ir.Value:
        fan_in = cin // group * kernel * kernel
        shape = (cout, cin // group, kernel, kernel)
        w = self.weight(f"{name}.weight", shape, math.sqrt(2 / fan_in))
        b = None
        if bias:
            b = self.const(f"{name}.bias", self.rng.normal(0.0, 0.1, size=cout).astype(np.float32))
        pad = kernel // 2
        inputs = [x, w] if b is None else [x, w, b]
        return self.op(
            "Conv",
            inputs,
            name,
            kernel_shape=[kernel, kernel],
            pads=[pad, pad, pad, pad],
            strides=[1, 1],
            group=group,
        )

    def batchnorm(self, x: ir.Value, name: str, channels: int, epsilon: float = 1e-5) -> ir.Value:
        rng = self.rng
        sign = np.where(rng.random(channels) < 0.25, -1.0, 1.0)
        gamma = sign * rng.uniform(0.5, 1.5, size=channels)
        beta = rng.normal(0.0, 0.2, size=channels)
        mean = rng.normal(0.0, 0.3, size=channels)
        var = rng.uniform(0.5, 2.0, size=channels)
        params = [
            self.const(f"{name}.{key}", value.astype(np.float32))
            for key, value in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))
        ]
        return self.op("BatchNormalization", [x, *params], name, epsilon=epsilon)

    def clip6(self, x: ir.Value, name: str) -> ir.Value:
        lo = self.const(f"{name}.min", np.array(0.0, dtype=np.float32))
        hi = self.const(f"{name}.max", np.array(6.0, dtype=np.float32))
        return self.op("Clip", [x, lo, hi], name)

    def linear(self, x: ir.Value, name: str, d_in: int, d_out: int) -> ir.Value:
        w = self.weight(f"{name}.weight", (d_in, d_out), math.sqrt(2 / (d_in + d_out)))
        b = self.const(f"{name}.bias", self.rng.normal(0.0, 0.05, size=d_out).astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}.matmul"), b], name)

    def layernorm(self, x: ir.Value, name: str, d: int, epsilon: float = 1e-12) -> ir.Value:
        gamma = self.const(f"{name}.scale", self.rng.uniform(0.5, 1.5, size=d).astype(np.float32))
        beta = self.const(f"{name}.bias", self.rng.normal(0.0, 0.1, size=d).astype(np.float32))
        return self.op("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=epsilon)

    # -- model --------------------------------------------------------------------------------
    def model(
        self, kind: str, x: ir.Value, y: ir.Value, out_shape: Sequence[int | str]
    ) -> ir.Model:
        y.name = "output"
        y.dtype = _FLOAT
        y.shape = ir.Shape(out_shape)
        graph = ir.Graph(
            inputs=[x],
            outputs=[y],
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": OPSET},
            name=kind,
        )
        return ir.Model(
            graph,
            ir_version=IR_VERSION,
            producer_name="lowbit.models.synthetic",
            metadata_props={"lowbit.model": kind, "lowbit.seed": str(self.seed)},
        )


def _check_positive(builder: str, **values: int) -> None:
    for key, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{builder}: {key} must be a positive integer, got {value}.")


def resnet_block(
    channels: int = 16, size: int = 8, in_channels: int = 3, seed: int = 0
) -> ir.Model:
    """A stem conv and one basic residual block; see the module docstring for the algebra."""
    _check_positive("resnet_block", channels=channels, size=size, in_channels=in_channels)
    b = _Builder(seed)
    x = ir.val("input", _FLOAT, ["batch", in_channels, size, size])
    s = b.conv(x, "stem.conv", in_channels, channels, 3, bias=True)
    s = b.op("Relu", [b.batchnorm(s, "stem.bn", channels)], "stem.relu")
    h = b.conv(s, "block.conv1", channels, channels, 3)
    h = b.op("Relu", [b.batchnorm(h, "block.bn1", channels)], "block.relu1")
    h = b.conv(h, "block.conv2", channels, channels, 3, bias=True)
    h = b.batchnorm(h, "block.bn2", channels)
    y = b.op("Relu", [b.op("Add", [s, h], "block.add")], "block.relu2")
    return b.model("resnet_block", x, y, ["batch", channels, size, size])


def mobilenet_block(channels: int = 16, expand: int = 4, size: int = 8, seed: int = 0) -> ir.Model:
    """A MobileNetV2 inverted residual block; see the module docstring for the algebra."""
    _check_positive("mobilenet_block", channels=channels, expand=expand, size=size)
    b = _Builder(seed)
    hidden = channels * expand
    x = ir.val("input", _FLOAT, ["batch", channels, size, size])
    h = b.conv(x, "expand.conv", channels, hidden, 1)
    h = b.clip6(b.batchnorm(h, "expand.bn", hidden), "expand.relu6")
    h = b.conv(h, "dw.conv", hidden, hidden, 3, group=hidden)
    h = b.clip6(b.batchnorm(h, "dw.bn", hidden, epsilon=1e-3), "dw.relu6")
    h = b.conv(h, "project.conv", hidden, channels, 1)
    h = b.batchnorm(h, "project.bn", channels)
    y = b.op("Add", [x, h], "residual.add")
    return b.model("mobilenet_block", x, y, ["batch", channels, size, size])


def transformer_encoder_block(
    d: int = 64, heads: int = 4, seq: int = 16, mlp: int | None = None, seed: int = 0
) -> ir.Model:
    """A post-norm BERT encoder layer; see the module docstring for the algebra."""
    mlp = 4 * d if mlp is None else mlp
    _check_positive("transformer_encoder_block", d=d, heads=heads, seq=seq, mlp=mlp)
    if d % heads:
        raise ValueError(f"transformer_encoder_block: d={d} is not divisible by heads={heads}.")
    head_dim = d // heads
    b = _Builder(seed)
    x = ir.val("input", _FLOAT, ["batch", seq, d])
    split = b.const("attn.split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge = b.const("attn.merge_heads", np.array([0, 0, d], dtype=np.int64))

    def heads_first(value: ir.Value, name: str) -> ir.Value:
        reshaped = b.op("Reshape", [value, split], f"{name}.split")
        return b.op("Transpose", [reshaped], f"{name}.heads", perm=[0, 2, 1, 3])

    q = heads_first(b.linear(x, "attn.q", d, d), "attn.q")
    k = heads_first(b.linear(x, "attn.k", d, d), "attn.k")
    v = heads_first(b.linear(x, "attn.v", d, d), "attn.v")
    k_t = b.op("Transpose", [k], "attn.k.t", perm=[0, 1, 3, 2])
    scale = b.const("attn.scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))
    scores = b.op("Mul", [b.op("MatMul", [q, k_t], "attn.qk"), scale], "attn.scores")
    probs = b.op("Softmax", [scores], "attn.probs", axis=-1)
    context = b.op("MatMul", [probs, v], "attn.context")
    context = b.op("Transpose", [context], "attn.context.t", perm=[0, 2, 1, 3])
    context = b.op("Reshape", [context, merge], "attn.merge")
    attn_out = b.linear(context, "attn.out", d, d)
    h = b.layernorm(b.op("Add", [x, attn_out], "attn.residual"), "attn.norm", d)

    u = b.linear(h, "mlp.fc1", d, mlp)
    inv_sqrt2 = b.const("mlp.gelu.inv_sqrt2", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))
    one = b.const("mlp.gelu.one", np.array(1.0, dtype=np.float32))
    half = b.const("mlp.gelu.half", np.array(0.5, dtype=np.float32))
    erf = b.op("Erf", [b.op("Mul", [u, inv_sqrt2], "mlp.gelu.scaled")], "mlp.gelu.erf")
    gate = b.op("Mul", [b.op("Add", [erf, one], "mlp.gelu.add1"), half], "mlp.gelu.gate")
    g = b.op("Mul", [u, gate], "mlp.gelu")
    y = b.linear(g, "mlp.fc2", mlp, d)
    y = b.layernorm(b.op("Add", [h, y], "mlp.residual"), "mlp.norm", d)
    return b.model("transformer_encoder_block", x, y, ["batch", seq, d])


def vgg_stack(
    channels: Sequence[int] = (64, 128, 128, 256, 256), size: int = 56, seed: int = 0
) -> ir.Model:
    """3×3 Conv + Relu layers from ``channels[0]`` through each later width; see the module docstring."""
    channels = tuple(channels)
    if len(channels) < 2:
        raise ValueError(f"vgg_stack: channels needs at least two widths (input and one conv), got {channels}.")
    _check_positive("vgg_stack", size=size, **{f"channels[{i}]": c for i, c in enumerate(channels)})
    b = _Builder(seed)
    x = ir.val("input", _FLOAT, ["batch", channels[0], size, size])
    h = x
    for i, (cin, cout) in enumerate(zip(channels, channels[1:]), start=1):
        h = b.op("Relu", [b.conv(h, f"conv{i}", cin, cout, 3, bias=True)], f"relu{i}")
    return b.model("vgg_stack", x, h, ["batch", channels[-1], size, size])
