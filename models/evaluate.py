"""Measure the task metric of lowbit's embedded reference models with onnxruntime.

Imports onnxruntime and numpy only (never torch). Each function takes either a model file path
or an already opened ``onnxruntime.InferenceSession``, so callers can pass a session that has
lowbit's custom op library registered. The model's first input and first output are used, so
renamed or rewritten graphs evaluate the same way.

* ``digits_top1`` — fraction of the 540 held-out digits whose arg-max logit is the label.
* ``llama_bits_per_byte`` — mean negative log2-likelihood of each next byte of the held-out
  text. The text is cut into non-overlapping windows of ``context + 1`` bytes that start every
  ``context`` bytes (window *k* is ``heldout[k·context : (k+1)·context + 1]``); the model reads the
  first ``context`` bytes of a window and is scored on predicting bytes 2..context+1 of it, so
  every scored byte is scored once and the first bytes of a window see a short context. Only
  whole windows inside the first ``max_bytes`` bytes are used; by default ``max_bytes`` =
  16,385, i.e. the first 128 windows (16,384 predicted bytes, about a third of the held-out
  text), which runs in a few seconds on 2 cores. ``max_bytes=None`` scores the whole held-out
  text. The result is deterministic: same model, same arguments, same number.
* ``llama_kl_bits`` — mean KL divergence KL(reference ‖ model), in bits per predicted byte, over
  the same windows: how far a compressed model's next-byte distributions are from the float
  model's. Unlike a difference of two ``llama_bits_per_byte`` figures it is never negative and
  carries no term from the text itself: bits/byte over float = KL + Σ (p_text − p_ref)·log(p_ref/p),
  and on held-out text that second term has a sign that depends on where each rounding error
  happened to fall.

Log-probabilities are computed in float64 with a stable log-softmax:
``log p_i = z_i − m − log Σ_j exp(z_j − m)``, ``m = max_j z_j``; bits = −log p / ln 2.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import onnxruntime as ort

from lowbit.models import data

__all__ = ["DEFAULT_MAX_BYTES", "digits_top1", "llama_bits_per_byte", "llama_kl_bits", "open_session"]

ModelLike = Union[str, "os.PathLike[str]", bytes, ort.InferenceSession]

#: Default number of held-out bytes read by ``llama_bits_per_byte`` (128 windows of 128 + 1).
DEFAULT_MAX_BYTES = 128 * 128 + 1

#: Windows (or images) per onnxruntime call.
_BATCH = 32


def open_session(model: ModelLike) -> ort.InferenceSession:
    """Return ``model`` if it is a session, else open it (path or serialized bytes) on the CPU with
    ``lowbit.runtime.session``, so lowered models find lowbit's op library."""
    from lowbit.runtime.session import session

    if isinstance(model, ort.InferenceSession):
        return model
    return session(bytes(model) if isinstance(model, bytearray) else model)


def _run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    return session.run([output_name], {input_name: batch})[0]


def digits_top1(model: ModelLike) -> float:
    """Top-1 accuracy of a digits classifier on the held-out split (540 images).

    The model takes float32 [batch, 1, 8, 8] in [0, 1] and returns [batch, 10] scores.
    """
    session = open_session(model)
    x_test, y_test = data.digits_eval_set()
    correct = 0
    for start in range(0, len(x_test), 256):
        logits = _run(session, np.ascontiguousarray(x_test[start : start + 256]))
        correct += int(np.sum(np.argmax(logits, axis=1) == y_test[start : start + 256]))
    return correct / len(y_test)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _log2_prob_of_targets(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    picked = np.take_along_axis(_log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return picked / np.log(2.0)


def heldout_windows(max_bytes: int | None = DEFAULT_MAX_BYTES, context: int = 128) -> np.ndarray:
    """The int64 [windows, context + 1] byte windows that ``llama_bits_per_byte`` scores."""
    if context < 1:
        raise ValueError(f"llama_bits_per_byte: context must be at least 1, got {context}.")
    heldout = np.frombuffer(data.text_split()[1], dtype=np.uint8).astype(np.int64)
    limit = len(heldout) if max_bytes is None else min(int(max_bytes), len(heldout))
    n_windows = (limit - 1) // context
    if n_windows < 1:
        raise ValueError(
            f"llama_bits_per_byte: max_bytes={max_bytes} leaves no whole window of "
            f"{context} + 1 bytes."
        )
    starts = np.arange(n_windows) * context
    return heldout[starts[:, None] + np.arange(context + 1)[None, :]]


def llama_bits_per_byte(
    model: ModelLike, max_bytes: int | None = DEFAULT_MAX_BYTES, context: int = 128
) -> float:
    """Bits per byte of a byte-level language model on the held-out text (see module doc).

    The model takes int64 tokens [batch, seq] and returns logits [batch, seq, 256] whose row t
    scores the byte at position t + 1.
    """
    session = open_session(model)
    windows = heldout_windows(max_bytes, context)
    total_bits = 0.0
    for start in range(0, len(windows), _BATCH):
        chunk = windows[start : start + _BATCH]
        logits = _run(session, np.ascontiguousarray(chunk[:, :-1]))
        total_bits -= float(_log2_prob_of_targets(logits, chunk[:, 1:]).sum())
    return total_bits / (windows.shape[0] * context)


def llama_kl_bits(
    model: ModelLike, reference: ModelLike, max_bytes: int | None = DEFAULT_MAX_BYTES, context: int = 128
) -> float:
    """Mean KL(reference ‖ model) in bits per predicted byte over ``llama_bits_per_byte``'s windows."""
    sessions = open_session(model), open_session(reference)
    windows = heldout_windows(max_bytes, context)
    total = 0.0
    for start in range(0, len(windows), _BATCH):
        chunk = np.ascontiguousarray(windows[start : start + _BATCH, :-1])
        log_p, log_ref = (_log_softmax(_run(s, chunk)) for s in sessions)
        total += float((np.exp(log_ref) * (log_ref - log_p)).sum())
    return float(total / (windows.shape[0] * context) / np.log(2.0))
