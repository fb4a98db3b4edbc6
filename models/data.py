"""Fixed evaluation and calibration data for lowbit's embedded reference models.

Two data sets, both shipped with the package or with Python itself, so nothing is fetched:

* **digits** — scikit-learn's ``load_digits`` (1797 grey 8x8 images, 10 classes), split once with
  ``train_test_split(test_size=0.3, random_state=0, stratify=y)``. The committed file
  ``digits_data.npz`` holds only what the compiler needs at run time:

  ================  ==========================  ===============================================
  key               dtype / shape               meaning
  ================  ==========================  ===============================================
  ``x_calib``       float32 [256, 1, 8, 8]      the first 256 training images (calibration)
  ``x_test``        float32 [540, 1, 8, 8]      the held-out images
  ``y_test``        int64   [540]               their labels 0..9
  ================  ==========================  ===============================================

  Images are NCHW and scaled to [0, 1] as ``pixel / 16``. The training images themselves are not
  stored; ``train_digits_cnn.py`` re-derives them with scikit-learn using the same split.

* **text** — the bytes of the standard library's ``pydoc_data.topics`` (the help texts of the
  Python language reference): the values joined in sorted-key order and encoded as UTF-8. The
  last 10% of the bytes are held out for evaluation (bits per byte), the first 90% train the
  byte-level language model.

This module imports numpy only (never torch or scikit-learn).
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np

__all__ = [
    "DIGITS_NPZ",
    "DIGITS_SPLIT",
    "TEXT_HELDOUT_FRACTION",
    "digits_calib",
    "digits_eval_set",
    "text_corpus",
    "text_split",
]

#: Path of the committed digits arrays.
DIGITS_NPZ = pathlib.Path(__file__).with_name("digits_data.npz")

#: Keyword arguments of the ``sklearn.model_selection.train_test_split`` call that made the split
#: (``stratify`` is the label vector).
DIGITS_SPLIT = {"test_size": 0.3, "random_state": 0}

#: Fraction of the text corpus (at its end) held out for evaluation.
TEXT_HELDOUT_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> dict[str, np.ndarray]:
    with np.load(DIGITS_NPZ) as npz:
        arrays = {key: npz[key] for key in ("x_calib", "x_test", "y_test")}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def digits_eval_set() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x_test, y_test)``: float32 [N, 1, 8, 8] in [0, 1] and int64 [N] labels.

    The arrays are read-only and shared between calls; copy them before changing them.
    """
    arrays = _digits_arrays()
    return arrays["x_test"], arrays["y_test"]


def digits_calib(n: int = 256) -> np.ndarray:
    """Return the first ``n`` calibration images, float32 [n, 1, 8, 8] in [0, 1] (read-only).

    Raises ``ValueError`` if ``n`` is not between 1 and the number stored (256).
    """
    calib = _digits_arrays()["x_calib"]
    if not 1 <= int(n) <= calib.shape[0]:
        raise ValueError(f"digits_calib: n must be between 1 and {calib.shape[0]}, got {n}.")
    return calib[: int(n)]


@functools.lru_cache(maxsize=1)
def text_corpus() -> bytes:
    """Return the text corpus: ``pydoc_data.topics`` values in sorted-key order, UTF-8 encoded.

    The result depends only on the Python version's help texts, never on dict order.
    """
    from pydoc_data import topics

    return "".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")


def text_split() -> tuple[bytes, bytes]:
    """Return ``(train_bytes, heldout_bytes)``: the corpus with its last 10% held out."""
    corpus = text_corpus()
    cut = len(corpus) - int(len(corpus) * TEXT_HELDOUT_FRACTION)
    return corpus[:cut], corpus[cut:]
