"""ImageNet-style evaluation and calibration crops for EfficientNet-Lite0, from scikit-image's photos.

No labelled ImageNet data can be fetched here, so a quantized classifier is judged by **top-1
agreement** with its float original: the fraction of crops on which both pick the same class.
The crops are random views of photographs shipped inside scikit-image (``skimage.data``,
offline) whose subject is one of the 1000 ImageNet classes (``PHOTOS``: a cat, an espresso cup,
a rocket, a moped, a cameraman's tripod, a wall clock; the greyscale ones stacked to RGB).
Photos without an ImageNet subject (``astronaut``, ``coins``) are left out on purpose: the float
model spreads its belief over many classes there, and top-1 agreement then measures ties, not
quantization error.

A crop (``random_crops``): photo ``i mod len(PHOTOS)`` for crop ``i``; a square side of
``s · min(H, W)`` with ``s`` uniform in ``SCALE`` = [0.5, 1] (scale jitter: at least a quarter of
the photo's central square's area), its top-left corner uniform over the positions that keep it
inside the photo, mirrored left-right with probability 1/2; then ``efficientnet_lite0.preprocess``
(bicubic resize to 224, ``(pixel − 127) / 128``, NCHW float32). All draws come from
``numpy.random.default_rng(seed)``: the evaluation set is 200 crops of seed ``EVAL_SEED``, the
calibration set 64 crops of seed ``CALIB_SEED``; no crop box (photo, corner, side, flip) of one
set is in the other.

How noisy the metric is: with 200 crops one flipped prediction is 0.5 points, and the binomial
standard error near 95% is about 1.5 points. Measured when this set was chosen (onnxruntime
1.31): 8-bit per-channel round-to-nearest weights alone (no activation quantization, BN not
folded) agree on 97.5% of these crops, and 6.5% of the crops have a float top-2 probability
margin under 0.05; on a harder variant (also ``astronaut`` and ``coins``, ``s`` from 0.4) the
same weights agree on only 91%, and 19.5% of the crops are within 0.05 of a tie.

Imports numpy, Pillow, scikit-image and onnxruntime (never torch).
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Union

import numpy as np

__all__ = [
    "CALIB_SEED",
    "EVAL_SEED",
    "PHOTOS",
    "calib_crops",
    "crop_boxes",
    "eval_crops",
    "logits",
    "photos",
    "random_crops",
    "top1_agreement",
    "write_calib",
]

#: scikit-image sample photographs used (``skimage.data`` function names; ``motorcycle`` is the
#: left view of ``stereo_motorcycle``), each with an ImageNet subject.
PHOTOS = ("chelsea", "coffee", "rocket", "motorcycle", "camera", "clock")
#: Range of the crop side as a fraction of the photo's shorter side.
SCALE = (0.5, 1.0)
N_EVAL, N_CALIB = 200, 64
EVAL_SEED, CALIB_SEED = 2024, 7
CALIB_NPZ = "lite0_calib.npz"

ModelLike = Union[str, "os.PathLike[str]", bytes, "onnxruntime.InferenceSession"]  # noqa: F821


@functools.lru_cache(maxsize=1)
def photos() -> dict[str, np.ndarray]:
    """The photos as uint8 RGB [H, W, 3] arrays (read-only), keyed by ``PHOTOS`` name."""
    from skimage import data

    images = {}
    for name in PHOTOS:
        image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        image.setflags(write=False)
        images[name] = image
    return images


def crop_boxes(n: int, seed: int) -> list[tuple[str, int, int, int, bool]]:
    """The ``n`` crops of ``seed`` as (photo, top, left, side, flipped)."""
    rng = np.random.default_rng(seed)
    images = photos()
    boxes = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        h, w = images[name].shape[:2]
        side = max(16, int(round(rng.uniform(*SCALE) * min(h, w))))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        boxes.append((name, top, left, side, bool(rng.random() < 0.5)))
    return boxes


def random_crops(n: int, seed: int) -> np.ndarray:
    """``n`` preprocessed crops, float32 [n, 3, 224, 224] (see module doc)."""
    from lowbit.models.efficientnet_lite0 import preprocess

    images = photos()
    out = np.empty((n, 3, 224, 224), dtype=np.float32)
    for i, (name, top, left, side, flipped) in enumerate(crop_boxes(n, seed)):
        crop = images[name][top : top + side, left : left + side]
        if flipped:
            crop = crop[:, ::-1]
        out[i] = preprocess(np.ascontiguousarray(crop))[0]
    return out


def eval_crops() -> np.ndarray:
    """The 200 evaluation crops, float32 [200, 3, 224, 224]."""
    return random_crops(N_EVAL, EVAL_SEED)


def calib_crops() -> np.ndarray:
    """The 64 calibration crops (disjoint from the evaluation crops), float32 [64, 3, 224, 224]."""
    return random_crops(N_CALIB, CALIB_SEED)


def write_calib(folder: str | os.PathLike[str], n: int = N_CALIB) -> pathlib.Path:
    """Write the calibration crops as lowbit ``--calib`` data (``input`` [n, 3, 224, 224]); return the path.

    ``n`` other than 64 draws that many crops from the calibration seed (the first 64 are the
    calibration set)."""
    path = pathlib.Path(folder) / (CALIB_NPZ if n == N_CALIB else f"lite0_calib_{n}.npz")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, input=random_crops(n, CALIB_SEED))
        os.replace(tmp, path)
    return path


def logits(model: ModelLike, images: np.ndarray, *, batch: int = 20) -> np.ndarray:
    """The model's first output on ``images`` (first input), ``batch`` images per call."""
    from lowbit.models.evaluate import open_session

    session = open_session(model)
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int):
        batch = fixed
    return np.concatenate([session.run(None, {name: np.ascontiguousarray(images[i : i + batch])})[0]
                           for i in range(0, len(images), batch)])


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose arg-max class is the same in the logits ``a`` and ``b``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"top1_agreement: expected two [N, classes] arrays of one shape, got {a.shape} and {b.shape}")
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
