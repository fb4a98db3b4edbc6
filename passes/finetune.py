"""``finetune``: train a compressed model's float weights to reproduce the original model — lossy.

The third step of Kim et al. (2015) after rank selection and Tucker decomposition, done without
labels as knowledge distillation: the teacher is the model as the pipeline received it (before
its first pass), the student the model as it is now. On calibration inputs x both run as jax
functions of their weights (``lowbit.core.jaxgraph``) and Adam minimises, summed over the float
outputs o, the relative squared error

    L = Σ_o mean((f_o(x; θ) − g_o(x))²) / mean(g_o(x)²)

over θ, the student's trainable weights: every float initializer of more than one element that
is a weight or bias of Conv, Gemm or MatMul, the constant operand of an Add, Sub or Mul (biases,
scales), the scale and bias of a Batch/LayerNormalization, or the table of a Gather (embeddings).
Everything else (shapes, clip bounds, scalars) is kept. ``train=changed`` narrows θ to the
weights the pipeline's earlier passes added or changed (the factors of a decomposition, refitted
layers): fewer parameters to fit to a small calibration set.

Data. The first ``samples`` calibration samples are held in memory; every 8th of them is held
out (none with fewer than 8), the rest are trained on in random batches of ``batch``. Mixup
(``mix``): that fraction of each batch is replaced by x' = λ·xᵢ + (1 − λ)·xⱼ, λ ~ U(0, 1), two
training samples mixed, and the teacher labels x' afresh. It multiplies a small calibration set
(256 digits) without any knowledge of the domain; models with an integer input (token ids) are
not mixed. The learning rate rises linearly to ``lr`` over the first 5 % of the steps (Adam's
first moments are noisy, and a pretrained model is knocked off its optimum by full-size first
steps), then follows a cosine to 0.

Checkpoint. The held-out loss is measured before training and every ``steps``/20 steps; the
weights with the lowest are kept, so the pass never returns a model worse on held-out samples
than the one it received (it then reports ``kept: "input"``).

Numbers (``tests/test_finetune.py``, ``python benchmarks/lowrank.py``): the digits CNN after
``tucker(rank=vbmf)`` (0.22× MACs) has top-1 0.665 with the closed-form refit; ``finetune`` with
the defaults brings it to 0.9926 (seeds 0–4: 0.9889–0.9963; float 0.9963) in about 40 s on 2
cores (12 ms a step). Cost grows with the model: jax on CPU takes about 2 s a step of 8
EfficientNet-Lite0 crops (XLA differentiates depthwise convolutions slowly; ``core.jaxgraph``
writes them as shifted products, 5× faster).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import numpy as np
import onnx_ir as ir

from lowbit.core.errors import UserError
from lowbit.passes.base import Pass, option

#: inputs of each op that hold trainable weights (when they are float initializers)
_WEIGHT_INPUTS = {
    "Conv": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "Gather": (0,),
}
#: the element types finetune trains and whose outputs it compares
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
#: samples the teacher labels, and the held-out loss is measured on, per call (without a fixed batch)
CHUNK = 256
#: every HOLD_OUT-th calibration sample is held out for the checkpoint choice
HOLD_OUT = 8
#: held-out evaluations over a run (the checkpoint's resolution)
EVALUATIONS = 20
#: the learning rate rises linearly over the first steps/WARMUP steps
WARMUP = 20


@dataclasses.dataclass
class FinetuneOptions:
    steps: int = option(3000, "Adam steps")
    lr: float = option(1e-2, "peak learning rate of Adam (linear warm-up over 5 % of the steps, then cosine decay to 0)")
    batch: int = option(64, "samples per step (the model's own batch size when it fixes one)")
    samples: int = option(1024, "calibration samples held in memory and trained on (the first ones)")
    mix: float = option(1.0, "fraction of each batch replaced by mixup of two calibration samples (0 to 1; float inputs only)")
    train: Literal["all", "changed"] = option("all", "which weights: all trainable ones, or only those the pipeline's passes added or changed")

    def validate(self) -> None:
        for name in ("steps", "batch", "samples"):
            if getattr(self, name) < 1:
                raise UserError(f"option '{name}' of pass finetune must be ≥ 1, not {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"option 'lr' of pass finetune must be > 0, not {self.lr}")
        if not 0 <= self.mix <= 1:
            raise UserError(f"option 'mix' of pass finetune must be between 0 and 1, not {self.mix}")


def _jax():
    try:
        import jax
    except ImportError:
        raise UserError("pass finetune needs jax: pip install 'lowbit[finetune]'") from None
    return jax


def trainable(graph: ir.Graph) -> dict[str, ir.Value]:
    """The initializers ``finetune`` trains (see the module doc), by name."""
    found = {}
    for node in graph:
        for index in _WEIGHT_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            value = node.inputs[index] if index < len(node.inputs) else None
            if (value is not None and value.name in graph.initializers and value.const_value is not None
                    and value.dtype in _FLOATS
                    and value.const_value.size > 1):
                found[value.name] = value
    return found


def _samples(ctx, limit: int) -> dict[str, np.ndarray]:
    feeds = ctx.calib.batches(limit)
    joined = {name: np.concatenate([f[name] for f in feeds])[:limit] for name in feeds[0]}
    return {name: a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)
            for name, a in joined.items()}


class Finetune(Pass):
    """Distil the model as the pipeline received it into the model as it is now: Adam on the float
    weights against the original's outputs on calibration data, mixup-augmented; keeps the
    checkpoint best on held-out samples (needs jax: ``lowbit[finetune]``)."""

    name = "finetune"
    Options = FinetuneOptions
    preserves = "lossy"
    wants_input_model = True

    def run(self, model: ir.Model, ctx) -> bool:
        o = self.options
        if ctx.calib is None:
            raise UserError("pass finetune needs calibration data (--calib): it trains on the original model's outputs")
        if ctx.input_model is None:
            raise UserError("pass finetune runs inside a pipeline, which gives it the input model as its teacher")
        jax = _jax()
        import jax.numpy as jnp

        from lowbit.core.jaxgraph import GraphFunction, check_supported

        for graph, which in ((ctx.input_model.graph, "the input model"), (model.graph, "the model")):
            check_supported(graph, f"pass finetune ({which})")
        weights = trainable(model.graph)
        if o.train == "changed":
            weights = {name: v for name, v in weights.items() if _changed(v, ctx.input_model.graph.initializers.get(name))}
        if not weights:
            ctx.note("reason", "no float weights to train; the model is unchanged")
            return False
        student, teacher = GraphFunction(model.graph), GraphFunction(ctx.input_model.graph)
        teacher_params = {n: jnp.asarray(a) for n, a in teacher.constants.items()
                          if np.issubdtype(a.dtype, np.floating) and a.size > 1}
        float_out = [i for i, v in enumerate(ctx.input_model.graph.outputs) if v.dtype in _FLOATS]

        data = _samples(ctx, o.samples)
        n = len(next(iter(data.values())))
        held = np.arange(n) % HOLD_OUT == HOLD_OUT - 1 if n >= HOLD_OUT else np.zeros(n, bool)
        train_idx, held_idx = np.flatnonzero(~held), np.flatnonzero(held)
        fixed = ctx.calib.fixed_batch
        batch = fixed or min(o.batch, len(train_idx))
        mixable = all(a.dtype == np.float32 for a in data.values())
        mix = o.mix if mixable else 0.0

        label = jax.jit(lambda p, feed: [teacher(p, feed)[i] for i in float_out])
        eval_idx = held_idx if len(held_idx) >= (fixed or 1) else train_idx
        chunks = _chunks(eval_idx, fixed)
        held_feeds = [{k: a[part] for k, a in data.items()} for part in chunks]
        held_targets = [[np.asarray(t) for t in label(teacher_params, feed)] for feed in held_feeds]
        scale = [max(float(np.mean(np.concatenate([c[i] for c in held_targets]).astype(np.float64) ** 2)), 1e-30)
                 for i in range(len(float_out))]

        def loss(params, feed, targets):
            outs = student(params, feed)
            return sum(jnp.mean((outs[i] - t) ** 2) / s for i, t, s in zip(float_out, targets, scale))

        def step(params, m, v, feed, targets, lr, t):
            value, grad = jax.value_and_grad(loss)(params, feed, targets)
            m = jax.tree_util.tree_map(lambda a, g: 0.9 * a + 0.1 * g, m, grad)
            v = jax.tree_util.tree_map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grad)
            params = jax.tree_util.tree_map(
                lambda p, a, b: p - lr * (a / (1 - 0.9 ** t)) / (jnp.sqrt(b / (1 - 0.999 ** t)) + 1e-8), params, m, v)
            return params, m, v, value

        step = jax.jit(step)
        held_loss = jax.jit(loss)

        def evaluate(params) -> float:
            """The loss on the held-out samples (chunk-weighted mean)."""
            total = sum(len(part) * float(held_loss(params, feed, targets))
                        for part, feed, targets in zip(chunks, held_feeds, held_targets))
            return total / sum(len(part) for part in chunks)

        params = {name: jnp.asarray(v.const_value.numpy().astype(np.float32)) for name, v in weights.items()}
        m = jax.tree_util.tree_map(jnp.zeros_like, params)
        v = jax.tree_util.tree_map(jnp.zeros_like, params)
        rng = ctx.rng("finetune")
        start = time.perf_counter()
        best_loss = first = evaluate(params)
        best, best_step, curve, recent = params, 0, [(0, None, round(first, 6))], []
        every = max(1, o.steps // EVALUATIONS)
        warmup = max(1, o.steps // WARMUP)
        for t in ctx.track(range(1, o.steps + 1), "finetune: steps", total=o.steps):
            pick = rng.choice(train_idx, batch, replace=len(train_idx) < batch)
            feed = {k: a[pick] for k, a in data.items()}
            if mix:
                lam = rng.uniform(0, 1, batch).astype(np.float32)
                other = rng.choice(train_idx, batch)
                use = rng.uniform(0, 1, batch) < mix
                for k, a in feed.items():
                    shape = (batch,) + (1,) * (a.ndim - 1)
                    mixed = lam.reshape(shape) * a + (1 - lam.reshape(shape)) * data[k][other]
                    feed[k] = np.where(use.reshape(shape), mixed, a).astype(np.float32)
            lr = o.lr * min(1.0, t / warmup) * 0.5 * (1 + np.cos(np.pi * (t - 1) / o.steps))
            params, m, v, value = step(params, m, v, feed, label(teacher_params, feed), np.float32(lr), np.float32(t))
            recent.append(value)
            if t % every == 0 or t == o.steps:
                current = evaluate(params)
                curve.append((t, round(float(np.mean(recent)), 6), round(current, 6)))
                recent = []
                if current < best_loss:
                    best_loss, best, best_step = current, params, t
        seconds = time.perf_counter() - start
        ctx.note("trained", {"weights": len(params), "parameters": int(sum(p.size for p in params.values()))})
        ctx.note("samples", {"train": int(len(train_idx)), "held_out": int(len(held_idx)), "mixed": mix})
        ctx.note("held_out_loss", {"before": round(first, 6), "after": round(best_loss, 6), "best_step": best_step})
        ctx.note("curve", curve)  # (step, mean training loss since the last point, held-out loss)
        ctx.note("seconds_per_step", round(seconds / o.steps, 4))
        if best_step == 0:
            ctx.note("kept", "input")
            ctx.warn("finetune did not lower the held-out loss; the weights are unchanged")
            return False
        ctx.note("kept", f"step {best_step}")
        for name, value in weights.items():
            array = np.asarray(best[name]).astype(value.dtype.numpy())
            value.const_value = ir.tensor(array, name=name)
        return True


def _changed(value: ir.Value, before: ir.Value | None) -> bool:
    """Whether initializer ``value`` is new or differs from ``before``, its namesake in the input model."""
    if before is None or before.const_value is None:
        return True
    a, b = value.const_value.numpy(), before.const_value.numpy()
    return a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b)


def _chunks(index: np.ndarray, fixed: int | None) -> list[np.ndarray]:
    """``index`` in runs of CHUNK samples, or of the model's fixed batch (a last partial one dropped)."""
    size = fixed or CHUNK
    return [index[s:s + size] for s in range(0, len(index), size) if not fixed or s + size <= len(index)]
