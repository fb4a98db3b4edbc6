"""The YOLOv8n detection harness (``lowbit.models.yolo``) on nudenet's real detector.

Needs ``nudenet==3.4.2`` (the ``test`` extra; only its ``320n.onnx`` is read, the package is
never imported) and scikit-image with Pillow for the photos. The float model is run once per
module on the 24 evaluation images (about 1 s).
"""

from __future__ import annotations

import ast
import sys

import numpy as np
import pytest

from lowbit.core.errors import UserError
from lowbit.models import yolo

FACE_FEMALE = yolo.LABELS.index("FACE_FEMALE")
FACE_MALE = yolo.LABELS.index("FACE_MALE")
FACES = {FACE_FEMALE, FACE_MALE}


@pytest.fixture(scope="module")
def eval_photos():
    return yolo.photos()


@pytest.fixture(scope="module")
def float_outputs(yolo_path, eval_photos):
    return yolo.run(yolo_path, eval_photos.images)


@pytest.fixture(scope="module")
def float_dets(float_outputs):
    return yolo.detect(float_outputs)


def _index(photos, view: yolo.View) -> int:
    return photos.views.index(view)


def _det(boxes, scores, classes) -> yolo.Detections:
    return yolo.Detections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                           np.asarray(scores, dtype=np.float64), np.asarray(classes, dtype=np.int64))


# --- the model file -------------------------------------------------------------------------


def test_model_file_and_labels(yolo_path):
    import onnx

    installed = yolo.model_path()
    assert "nudenet" not in sys.modules and "cv2" not in sys.modules  # found, never imported
    assert installed.name == "320n.onnx" and yolo_path != installed
    assert yolo_path.stat().st_size == installed.stat().st_size
    proto = onnx.load(yolo_path, load_external_data=False)
    assert [i.name for i in proto.graph.input] == [yolo.INPUT]
    assert [o.name for o in proto.graph.output] == [yolo.OUTPUT]
    meta = {p.key: p.value for p in proto.metadata_props}
    # The label list copied from nudenet is the one Ultralytics stored in the file.
    names = ast.literal_eval(meta["names"])
    assert tuple(names[i] for i in range(len(names))) == yolo.LABELS
    assert ast.literal_eval(meta["imgsz"]) == [yolo.SIZE, yolo.SIZE]


def test_model_path_without_nudenet(monkeypatch):
    monkeypatch.setattr(yolo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"nudenet.*pip install -e '\.\[test\]'"):
        yolo.model_path()


def test_runs_with_batch_and_fixed_shape(yolo_path, eval_photos, float_outputs, tmp_path):
    """Batches of 1 and 8 and copies with the input fixed to 1×3×320×320 and 2×3×320×320 (the
    last batch padded) give the same outputs."""
    import onnx_ir as ir

    x = eval_photos.images[:3]
    assert float_outputs.shape == (24, 4 + len(yolo.LABELS), 40 * 40 + 20 * 20 + 10 * 10)
    one = yolo.run(yolo_path, x, batch=1)
    np.testing.assert_allclose(one, float_outputs[:3], rtol=0, atol=1e-3)
    for fixed_batch in (1, 2):
        model = ir.load(yolo_path)
        model.graph.inputs[0].shape = ir.Shape([fixed_batch, 3, yolo.SIZE, yolo.SIZE])
        model.graph.outputs[0].shape = ir.Shape([fixed_batch, 4 + len(yolo.LABELS), 2100])
        fixed = tmp_path / f"fixed{fixed_batch}.onnx"
        ir.save(model, fixed)
        np.testing.assert_allclose(yolo.run(fixed, x, batch=8), one, rtol=0, atol=1e-3)


# --- photos and letterboxing ----------------------------------------------------------------


def test_photo_sets(eval_photos):
    calib = yolo.photos(calib=True)
    assert eval_photos.images.shape == (24, 3, yolo.SIZE, yolo.SIZE) and eval_photos.images.dtype == np.float32
    assert calib.images.shape == (40, 3, yolo.SIZE, yolo.SIZE)
    for images in (eval_photos.images, calib.images):
        assert images.min() >= 0.0 and images.max() <= 1.0
    # No photo and no LFW patch is in both sets.
    assert not {v.photo for v in yolo.EVAL_VIEWS if v.photo != "lfw"} & {v.photo for v in yolo.CALIB_VIEWS}
    eval_lfw = {i for v in yolo.EVAL_VIEWS for i in v.lfw}
    calib_lfw = {i for v in yolo.CALIB_VIEWS for i in v.lfw}
    assert not eval_lfw & calib_lfw and len(eval_lfw) == 59 + 16 and len(calib_lfw) == 41 + 25
    assert len(set(yolo.EVAL_VIEWS)) == len(yolo.EVAL_VIEWS)
    # Deterministic: rendering again gives the same bits.
    again = yolo.render(yolo.EVAL_VIEWS[:3])
    assert np.array_equal(again.images, eval_photos.images[:3])


def test_letterbox_maps_boxes_back_exactly():
    # A 640×480 photo with a white rectangle x ∈ [100, 300), y ∈ [60, 200): scale 1/2, 40 rows of
    # padding above and below. Bilinear halving keeps the edges at even coordinates.
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    image[60:200, 100:300] = 255
    pixels, box = yolo.letterbox(image)
    assert (box.scale_x, box.scale_y, box.left, box.top) == (0.5, 0.5, 0, 40)
    grey = np.float32(yolo.PAD) / np.float32(255)
    assert np.all(pixels[:, :40] == grey) and np.all(pixels[:, 280:] == grey)
    ys, xs = np.nonzero(pixels[0] > 0.75)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
    np.testing.assert_array_equal(found, [50, 70, 150, 140])
    np.testing.assert_array_equal(box.to_original(found), [100, 60, 300, 200])
    np.testing.assert_array_equal(box.to_input([100, 60, 300, 200]), found)
    # A portrait photo is padded left and right, and boxes beyond the photo are clipped to it.
    _, tall = yolo.letterbox(np.zeros((640, 480, 3), dtype=np.uint8))
    assert (tall.left, tall.top) == (40, 0)
    np.testing.assert_array_equal(tall.to_original([[30, -5, 100, 400]]), [[0, 0, 120, 640]])


# --- the float model on the photos ----------------------------------------------------------


def test_float_model_finds_the_astronauts_face(eval_photos, float_dets):
    whole = _index(eval_photos, yolo.View("astronaut"))
    mirrored = _index(eval_photos, yolo.View("astronaut", flip=True))
    dets, box = float_dets[whole], eval_photos.transforms[whole]
    assert (box.width, box.height) == (512, 512)
    faces = [k for k, c in enumerate(dets.classes) if c in FACES]
    assert len(faces) == 1 and dets.classes[faces[0]] == FACE_FEMALE and dets.scores[faces[0]] > 0.6
    x1, y1, x2, y2 = box.to_original(dets.boxes[faces[0]], clip=False)
    # Inside the photo, centred in the upper half, a face-sized and roughly square box.
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    assert (y1 + y2) / 2 < 256 and 128 < (x1 + x2) / 2 < 384
    assert 0.1 < (x2 - x1) / 512 < 0.4 and 0.7 < (y2 - y1) / (x2 - x1) < 1.4
    # The mirrored photo's face box, mirrored back, lands on the same face.
    m = float_dets[mirrored]
    k = [i for i, c in enumerate(m.classes) if c == FACE_FEMALE]
    assert len(k) == 1
    mx1, my1, mx2, my2 = eval_photos.transforms[mirrored].to_original(m.boxes[k[0]])
    assert yolo.box_iou([x1, y1, x2, y2], [512 - mx2, my1, 512 - mx1, my2])[0, 0] > 0.9


def test_float_model_on_the_other_photos(eval_photos, float_dets):
    counts = np.bincount(np.concatenate([d.classes for d in float_dets]), minlength=len(yolo.LABELS))
    # Enough detections, and mostly faces, for the pruning statistics to mean something.
    assert counts.sum() >= 40 and counts[FACE_FEMALE] + counts[FACE_MALE] >= 0.8 * counts.sum()
    for view, dets, box in zip(eval_photos.views, float_dets, eval_photos.transforms):
        if view.photo == "camera":  # the cameraman: his face is the best detection, in the upper half
            assert dets.classes[0] in FACES and dets.scores[0] > 0.3
            top = view.crop[0] if view.crop else 0
            assert box.to_original(dets.boxes[0])[[1, 3]].mean() + top < 512 / 2
        elif view.photo == "lfw":
            # One face per grid cell at most, centred in a cell; none on background patches.
            cells = int(np.ceil(np.sqrt(len(view.lfw))))
            tile = yolo.SIZE // cells
            centres = (dets.boxes[:, :2] + dets.boxes[:, 2:]) / 2
            cell = (centres[:, 1] // tile) * cells + centres[:, 0] // tile
            assert len(np.unique(cell)) == len(cell)
            assert np.all(np.abs(centres % tile - tile / 2) < tile / 4)
            if view.lfw[0] >= 100:
                assert len(dets) == 0
            else:
                assert set(dets.classes) <= FACES and len(dets) >= len(view.lfw) / 2
        elif view.photo != "astronaut":  # no people in these photos
            assert not set(dets.classes) & FACES, view.name


# --- decoding and non-maximum suppression ---------------------------------------------------


def _raw(rows):
    """output0 [1, 22, len(rows)] from (cx, cy, w, h, class, score) rows."""
    out = np.zeros((1, 4 + len(yolo.LABELS), len(rows)), dtype=np.float32)
    for a, (cx, cy, w, h, c, s) in enumerate(rows):
        out[0, :4, a] = cx, cy, w, h
        out[0, 4 + c, a] = s
    return out


def test_nms_suppresses_a_planted_duplicate():
    raw = _raw([
        (100, 100, 50, 50, FACE_FEMALE, 0.9),
        (102, 101, 50, 50, FACE_FEMALE, 0.8),  # IoU 0.89 with the first: suppressed
        (100, 100, 50, 50, FACE_MALE, 0.7),    # same box, other class: kept
        (200, 100, 50, 50, FACE_FEMALE, 0.6),  # far away: kept
        (130, 100, 50, 50, FACE_FEMALE, 0.5),  # IoU 20/80 = 0.25 with the first: kept
        (250, 250, 20, 20, FACE_FEMALE, 0.2),  # below conf: dropped
    ])
    (dets,) = yolo.detect(raw)
    np.testing.assert_allclose(dets.scores, [0.9, 0.7, 0.6, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(dets.classes, [FACE_FEMALE, FACE_MALE, FACE_FEMALE, FACE_FEMALE])
    np.testing.assert_array_equal(dets.boxes[0], [75, 75, 125, 125])
    (loose,) = yolo.detect(raw, iou=0.2)  # the box at IoU 0.25 now goes too
    np.testing.assert_allclose(loose.scores, [0.9, 0.7, 0.6], rtol=1e-6)
    assert len(yolo.detect(raw, conf=0.95)[0]) == 0


def test_nms_on_the_real_output(eval_photos, float_outputs, float_dets):
    whole = _index(eval_photos, yolo.View("astronaut"))
    scores = float_outputs[whole, 4 + FACE_FEMALE]
    candidates = int(np.sum((scores >= 0.25) & (scores == float_outputs[whole, 4:].max(axis=0))))
    kept = int(np.sum(float_dets[whole].classes == FACE_FEMALE))
    assert candidates >= 5 and kept == 1
    # Planting a copy of the best anchor, shifted one pixel and a little less sure, changes nothing.
    raw = float_outputs[whole:whole + 1].copy()
    best = int(np.argmax(scores))
    planted = raw[:, :, best].copy()
    planted[:, 0] += 1
    planted[:, 4 + FACE_FEMALE] *= 0.99
    raw = np.concatenate([raw, planted[:, :, None]], axis=2)
    (again,) = yolo.detect(raw)
    ref = float_dets[whole]
    np.testing.assert_array_equal(again.boxes, ref.boxes)
    np.testing.assert_array_equal(again.classes, ref.classes)


# --- matching detections --------------------------------------------------------------------


def test_compare_with_itself(float_dets):
    result = yolo.compare(float_dets, float_dets)
    n = sum(len(d) for d in float_dets)
    assert result["float_detections"] == result["other_detections"] == result["matched"] == n
    assert result["matched_fraction"] == 1.0 and result["mean_iou"] == 1.0 and result["min_iou"] == 1.0
    assert result["mean_score_diff"] == 0.0 and result["extra"] == 0


def test_compare_shifted_boxes(float_dets):
    """Boxes moved by (dx, dy): IoU = (w−dx)(h−dy) / (2wh − (w−dx)(h−dy)) for each pair."""
    dx, dy, ds = 3.0, 2.0, 0.0125
    ref = [_det(d.boxes, d.scores, d.classes) for d in float_dets]
    moved = [_det(d.boxes + [dx, dy, dx, dy], d.scores - ds, d.classes) for d in ref]
    boxes = np.concatenate([d.boxes for d in ref])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    inter = (w - dx) * (h - dy)
    expected = inter / (2 * w * h - inter)
    assert expected.min() >= 0.5  # every pair still matches
    result = yolo.compare(ref, moved)
    assert result["matched_fraction"] == 1.0 and result["extra"] == 0
    assert result["mean_iou"] == pytest.approx(expected.mean(), abs=1e-6)
    assert result["min_iou"] == pytest.approx(expected.min(), abs=1e-6)
    assert result["mean_score_diff"] == pytest.approx(ds, abs=1e-6)


def test_compare_counts_misses_and_extras():
    a = _det([[0, 0, 10, 10], [50, 50, 70, 70]], [0.9, 0.8], [FACE_FEMALE, FACE_FEMALE])
    b = _det([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 70, 70], [100, 100, 110, 110]],
             [0.85, 0.84, 0.7, 0.6], [FACE_FEMALE, FACE_FEMALE, FACE_MALE, FACE_FEMALE])
    # The first float box matches once (its duplicate is extra); the second has the wrong class.
    result = yolo.compare([a], [b])
    assert (result["matched"], result["extra"], result["matched_fraction"]) == (1, 3, 0.5)
    assert result["mean_iou"] == 1.0 and result["mean_score_diff"] == pytest.approx(0.05, abs=1e-12)
    # Below the IoU bar nothing matches: a box shifted by half its width has IoU 1/3.
    c = _det([[5, 0, 15, 10]], [0.9], [FACE_FEMALE])
    assert yolo.compare([a], [c])["matched"] == 0
    assert yolo.compare([a], [c], iou_match=0.3)["mean_iou"] == pytest.approx(1 / 3, abs=1e-12)
    empty = _det(np.zeros((0, 4)), [], [])
    assert yolo.compare([empty], [empty])["matched_fraction"] == 1.0
    assert yolo.compare([empty], [a])["matched_fraction"] == 0.0
    with pytest.raises(ValueError, match="images"):
        yolo.compare([a], [a, a])


# --- calibration ----------------------------------------------------------------------------


def test_calibration_file(yolo_path, tmp_path):
    from lowbit.core import io
    from lowbit.core.calib import open_calibration

    path = yolo.calibration(tmp_path)
    assert path == tmp_path / yolo.CALIB_NPZ
    with np.load(path) as data:
        assert list(data) == [yolo.INPUT]
        np.testing.assert_array_equal(data[yolo.INPUT], yolo.photos(calib=True).images)
    assert yolo.calibration(tmp_path / "sub" / "mine.npz") == tmp_path / "sub" / "mine.npz"
    calib = open_calibration(str(path), io.load(yolo_path), batch_size=4)
    assert [feed[yolo.INPUT].shape[0] for feed in calib] == [4] * 10
